"""Reading a dataset as users have it: one file, a folder or an s3:// prefix of `.jsonl`, `.jsonl.gz` or
`.parquet` shards, parsed record by record, with what was read, kept and skipped counted per source."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from wmtp.config import DEFAULT_LANGUAGES
from wmtp.data.records import BadRecord, DataError, Example, parser
from wmtp.storage import Location, Storage, parse_uri

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_PARQUET_ROWS = 1024  # rows decoded at a time: a large shard never becomes Python objects all at once


@dataclass
class SourceStats:
    """What one source gave: records read, examples kept, records skipped by reason, and tokens kept."""

    name: str
    uri: str
    shards: int = 0
    read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics: `data/<name>/read`, `.../kept`, `.../tokens`, `.../skipped/<reason>`."""
        prefix = f"data/{self.name}"
        counts = {"shards": self.shards, "read": self.read, "kept": self.kept, "tokens": self.tokens}
        return {f"{prefix}/{key}": float(value) for key, value in counts.items()} | {
            f"{prefix}/skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())
        }

    def __str__(self) -> str:
        skipped = ",".join(f"{reason}:{n}" for reason, n in sorted(self.skipped.items())) or "0"
        return (
            f"source={self.name} uri={self.uri} shards={self.shards} read={self.read} kept={self.kept} "
            f"skipped={skipped} tokens={self.tokens}"
        )


def shards(uri: str, storage: Storage) -> list[Location]:
    """The files a dataset URI names: itself if it is a file or an object, else the `.jsonl`, `.jsonl.gz` and
    `.parquet` files below it (hidden folders, such as the puller's state, left out), in name order."""
    loc = parse_uri(uri)
    objects = storage.objects(loc)
    if not objects and not storage.exists(loc):  # an empty local folder exists; an empty prefix does not
        raise DataError(str(storage.missing(loc, uri)))
    if len(objects) == 1 and objects[0].loc == loc:
        return [loc]
    found = [o.loc for o in objects if _is_shard(o.rel)]
    if not found:
        raise DataError(f"{uri}: no {', '.join(SUFFIXES)} files in it")
    return sorted(found, key=lambda shard: shard.path)


def _is_shard(rel: str) -> bool:
    return rel.endswith(SUFFIXES) and not any(part.startswith(".") for part in rel.split("/"))


def records(shard: Location, storage: Storage) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a shard, `where` naming its file and line (or row) for messages."""
    raw = storage.read_bytes(shard)
    if raw[:4] == b"PAR1":  # parquet's magic: trust the content, not the file name
        yield from _parquet_rows(shard.uri, raw)
        return
    if raw[:2] == b"\x1f\x8b":  # gzip's magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{shard.uri}: not a readable gzip file ({err})") from None
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines breaks on.
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{shard.uri}:{lineno}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text (byte {err.start} of the line)") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{where}: not valid JSON: {str(err)[:200]}") from None


def _parquet_rows(uri: str, raw: bytes) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(io.BytesIO(raw)).iter_batches(batch_size=_PARQUET_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{uri} row {row}", record
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{uri}: not a readable parquet file ({str(err)[:200]})") from None


def load_source(
    uri: str,
    fmt: str,
    storage: Storage,
    max_samples: int | None = None,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    name: str = "",
) -> tuple[list[Example], SourceStats]:
    """Every record of the dataset at `uri` as an Example (up to `max_samples`), and the counts of the source."""
    parse = parser(fmt, languages)
    stats = SourceStats(name or uri, uri)
    examples: list[Example] = []
    for where, record in _all_records(shards(uri, storage), storage, stats):
        if max_samples is not None and len(examples) >= max_samples:
            break
        stats.read += 1
        try:
            if not isinstance(record, dict):
                raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
            parsed = parse(record)
        except BadRecord as err:
            raise DataError(f"{where}: {fmt} record: {err}") from None
        if isinstance(parsed, str):
            stats.skipped[parsed] += 1
        else:
            examples.append(parsed)
    stats.kept = len(examples)
    return examples, stats


def _all_records(found: list[Location], storage: Storage, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    for shard in found:
        stats.shards += 1
        yield from records(shard, storage)


def load_examples(
    uri: str, fmt: str, storage: Storage, max_samples: int | None = None, languages: Sequence[str] = DEFAULT_LANGUAGES
) -> list[Example]:
    """`load_source` without the counts."""
    return load_source(uri, fmt, storage, max_samples, languages)[0]
