"""The shapes of the URIs and paths a run names, written once for the trainer's config models, the WMTPRun CRD
(as `pattern`s the API server checks) and the operator (which parses every spec with the same models).

The rules: an s3:// URI has a valid bucket name (3–63 characters: lower-case letters, digits, dots, hyphens) and,
where it names a model or a dataset, a key; no path or key has a `..` segment, an empty segment or a control
character; a URL (an S3 endpoint, an MLflow server) is http:// or https://, and no URI carries credentials
(`user:password@`: they go in the environment or a Secret). The patterns are RE2-compatible (the API server's
engine), and Python's `re` and pydantic's engine read them the same way.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from wmtp.config.bounded import clip

MAX_URI = 1024

_CHAR = r"[^/\x00-\x1f\x7f]"
_LEAD = r"[^/.\x00-\x1f\x7f]"
# One path segment, never empty and never `..`: `x…`, `.x…`, `..x…` (and `...`) or `.`.
SEGMENT = rf"(?:{_LEAD}{_CHAR}*|\.{_LEAD}{_CHAR}*|\.\.{_CHAR}+|\.)"
_PATH = rf"{SEGMENT}(?:/{SEGMENT})*/?"
BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"

S3_OBJECT = rf"^s3://{BUCKET}/{_PATH}$"  # a model or a dataset: a bucket and a key (or prefix)
S3_ROOT = rf"^s3://{BUCKET}(?:/(?:{_PATH})?)?$"  # a checkpoint root: a bucket, optionally a prefix
FILE_URI = rf"^file:///{_PATH}$"
ABSOLUTE = rf"^/{_PATH}$"
RELATIVE = rf"^{_PATH}$"
# No user:password@ can fit: the host comes straight after `://` and a port is digits.
HTTP_URL = rf"^https?://{_HOST}(?::[0-9]{{1,5}})?(?:[/?#][^\s\x00-\x1f\x7f]*)?$"
LOCAL_TRACKING = rf"^sqlite:///(?:/?{_PATH})$|{FILE_URI}"
REGION = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

# Where the trainer reads (a model, a dataset) or writes (checkpoints); relative paths are the trainer's own
# (a laptop's), the WMTPRun's are absolute (`models` there, and the CEL rule of checkpoints.basePath).
LOCATION = f"{S3_OBJECT}|{FILE_URI}|{ABSOLUTE}|{RELATIVE}"
ROOT = f"{S3_ROOT}|{FILE_URI}|{ABSOLUTE}|{RELATIVE}"
POD_LOCATION = f"{S3_OBJECT}|{FILE_URI}|{ABSOLUTE}"
POD_ROOT = f"{S3_ROOT}|{FILE_URI}|{ABSOLUTE}"
TRACKING = f"{HTTP_URL}|{LOCAL_TRACKING}"


def redact_uri(uri: str) -> str:
    """`uri` (or a text quoting URIs) with any user:password@ (or token@) part replaced, for logs, records, statuses
    and Events. Up to the authority's last `@`: a password with an unescaped `@` in it is hidden whole."""
    return re.sub(r"(?<=://)[^/?#\s]*@", "***@", uri)


def _problem(value: str) -> str:
    """What is wrong with a URI that matched none of the shapes it may have, in a few words."""
    if re.search(r"://[^/@\s]*@", value):
        return ("credentials do not belong in a URI: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3), or name a Secret")
    if re.search(r"(^|/)\.\.(/|$)", value):
        return "a `..` segment leaves the folder it names"
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme and scheme not in ("s3", "file", "http", "https", "sqlite"):
        return f"unknown URI scheme {clip(scheme, 20)!r}"
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not re.fullmatch(BUCKET, bucket):
            return "the bucket name must be 3-63 lower-case letters, digits, dots and hyphens"
        if not key.strip("/"):
            return "an s3:// URI of a model or dataset names a key: s3://bucket/key"
    if re.search(r"//", value.split("://", 1)[-1]) or re.search(r"[\x00-\x1f\x7f]", value):
        return "an empty segment or a control character"
    return ""


def shaped(pattern: str, what: str) -> Any:
    """A string field of this shape: the pattern in the JSON schema (the CRD), and the same check with words."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            why = _problem(value)
            raise ValueError(f"{clip(redact_uri(value), 120)!r} is not {what}{f' ({why})' if why else ''}")
        return value

    schema = {"pattern": pattern}
    return Annotated[str, Field(min_length=1, max_length=MAX_URI, json_schema_extra=schema), AfterValidator(check)]


Location = shaped(LOCATION, "s3://bucket/key, file:///path or a path")
Root = shaped(ROOT, "s3://bucket[/prefix], file:///path or a path")
PodLocation = shaped(POD_LOCATION, "s3://bucket/key, file:///path or an absolute path")
PodRoot = shaped(POD_ROOT, "s3://bucket[/prefix], file:///path or an absolute path")
Url = shaped(HTTP_URL, "an http:// or https:// URL without credentials")
TrackingUri = shaped(TRACKING, "an http(s):// URL without credentials, sqlite:///path or file:///path")
Region = Annotated[str, Field(min_length=1, max_length=64, pattern=REGION)]
