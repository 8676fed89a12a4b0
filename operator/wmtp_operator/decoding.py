"""Decoding what the API server sends, so that no object can stop the operator.

An object's free-form parts (a custom resource the CRD left open, an annotation's JSON) can nest as deep as the
API server allows, about a thousand levels: Python's JSON decoder recurses, and kopf decodes every listed and
watched object before any handler runs, so one deep object used to raise RecursionError in kopf's watcher, end
`kopf.run`, and do the same after every restart. Here, a body nested deeper than MAX_DEPTH has its containers at
that depth emptied before it is decoded, and an integer too long to be Kubernetes' is read as a float: what
remains is still too deep for any model the operator validates it with (spec.recipe is refused with
`Valid=False`), but it decodes, so the operator can say so and go on with the other runs.

`install` makes kopf's decoding (aiohttp's `response.json()` for lists, `json.loads` for watch streams) this
one; `kube` decodes its own responses with `loads`.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any

from wmtp.config import json_nested_over

MAX_DEPTH = 100  # a Kubernetes object nests about fifteen levels; a validated spec.recipe at most twenty
MAX_INT_DIGITS = 20  # int64: 19 digits and a sign
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.S)


def _number(digits: str) -> int | float:
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def _pruned(text: str, limit: int) -> str:
    """`text` with every container at depth limit + 1 emptied (strings skipped): `[[[…]]]` becomes `[[[]]]`."""
    kept: list[str] = []
    depth, resume = 0, 0
    for token in _TOKEN.finditer(text):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth == limit + 1:
                kept.append(text[resume : token.end()])
        elif bracket in ("]", "}"):
            if depth == limit + 1:
                resume = token.start()
            depth -= 1
    kept.append(text[resume:] if depth <= limit else "")
    return "".join(kept)


def loads(data: str | bytes | bytearray, **_: Any) -> Any:
    """`json.loads` for API responses: never deeper than MAX_DEPTH, never an unbounded integer."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    if json_nested_over(text, MAX_DEPTH):
        text = _pruned(text, MAX_DEPTH)
    return json.loads(text, parse_int=_number)


def install() -> None:
    """Make kopf decode with `loads`: aiohttp's default decoder (kopf's lists and single reads) and the `json`
    that kopf's watch stream calls. A kopf or aiohttp that moved these fails here, not on a deep object."""
    import aiohttp
    from kopf._cogs.clients import api

    defaults = aiohttp.ClientResponse.json.__kwdefaults__
    if defaults is None or "loads" not in defaults or getattr(api, "json", None) is None:
        raise RuntimeError("cannot install the bounded JSON decoder: kopf or aiohttp changed")
    defaults["loads"] = loads
    api.json = types.SimpleNamespace(loads=loads, dumps=json.dumps, JSONDecodeError=json.JSONDecodeError)
