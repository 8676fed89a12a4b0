"""The shapes the API server checks (OpenAPI `pattern`s, bounds) and the operator parses: Kubernetes names, image
references, quantities, durations, and how large an inline recipe may be. RE2-compatible, since the API server
evaluates them with Go's regexp. (URIs and paths: `wmtp.config.uris`, shared with the trainer.)"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from wmtp.config import DOCUMENT, uris

# Kubernetes names: a DNS-1123 subdomain (Secrets, ConfigMaps, ServiceAccounts) and a ConfigMap key.
NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
# A dataset name becomes a folder under /models/data: one path segment, never `..`.
DATASET = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
# The API server's resource.Quantity (e.g. 500m, 8Gi, 1e3), as controller-gen writes it but never negative: no
# resource, request or volume size is.
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# A label key or resource name (a qualified name: [DNS-subdomain prefix/]name of at most 63), and a label value.
_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME = rf"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# An image reference (the distribution grammar): [registry[:port]/]path[:tag][@digest], no whitespace.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
IMAGE = (
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
DURATION = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
MAX_URI = uris.MAX_URI
MAX_DURATION = "720h"  # 30 days: longer than any wait the operator bounds, shorter than Go's durations overflow
MAX_DATASETS = 32
# Pods are named <run>-a<attempt>-<index>: the name leaves room for 9999 of them (crd.MAX_NAME).
MAX_PODS = 9999
# spec.recipe (inline) and a recipeRef ConfigMap's recipe: a recipe is a few KB and five levels; the YAML parser and
# pydantic spend CPU that all runs share on every byte, and the rendered ConfigMap must fit the API server.
RECIPE = DOCUMENT.within(max_bytes=32 * 1024, max_depth=16, max_nodes=4096, max_string=8192)


def duration_rule(field: str, minimum: str) -> tuple[str, str]:
    """The CEL rule bounding a duration field (the API server's CEL parses 1h30m as Go does)."""
    return (
        f"duration(self) >= duration('{minimum}') && duration(self) <= duration('{MAX_DURATION}')",
        f"{field} must be at least {minimum} and at most {MAX_DURATION}",
    )


def check_duration(text: str, field: str, minimum: str) -> str:
    """The same bound, for the operator (a spec the CRD never checked: another version, an emulator)."""
    if not duration_seconds(minimum) <= duration_seconds(text) <= duration_seconds(MAX_DURATION):
        raise ValueError(f"{field} must be at least {minimum} and at most {MAX_DURATION}")
    return text


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}  # fmt: skip


def quantity_value(quantity: int | str) -> Decimal:
    """A quantity's value (8Gi → 8589934592), to compare requests with limits."""
    if isinstance(quantity, int):
        return Decimal(quantity)
    number, suffix = re.fullmatch(r"\+?([0-9.]*(?:[eE][-+]?[0-9.]+)?)([a-zA-Z]*)", quantity).groups()  # type: ignore[union-attr]
    try:
        return Decimal(number) * _SUFFIX[suffix]
    except (InvalidOperation, KeyError):
        raise ValueError(f"{quantity!r} is not a quantity") from None


def duration_seconds(text: str) -> int:
    """Seconds in a duration such as 30m, 1h30m or 90s."""
    match = re.fullmatch(DURATION, text)
    if not match or not text:
        raise ValueError(f"{text!r} is not a duration such as 30m, 1h30m or 90s")
    hours, minutes, seconds = (int(part[:-1]) if part else 0 for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds
