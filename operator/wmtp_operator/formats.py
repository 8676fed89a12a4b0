"""The shapes the API server checks (OpenAPI `pattern`s, bounds) and the operator parses: Kubernetes names, image
references, quantities, durations. RE2-compatible, since the API server evaluates them with Go's regexp."""

from __future__ import annotations

import re

# Kubernetes names: a DNS-1123 subdomain (Secrets, ConfigMaps, ServiceAccounts) and a ConfigMap key.
NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
# A dataset name becomes a folder under /models/data: one path segment, never `..`.
DATASET = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
# The API server's resource.Quantity (e.g. 500m, 8Gi, 1e3), as controller-gen writes it.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# An image reference (the distribution grammar): [registry[:port]/]path[:tag][@digest], no whitespace.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
IMAGE = (
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
DURATION = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
MAX_URI = 1024
MAX_DATASETS = 32


def duration_seconds(text: str) -> int:
    """Seconds in a duration such as 30m, 1h30m or 90s."""
    match = re.fullmatch(DURATION, text)
    if not match or not text:
        raise ValueError(f"{text!r} is not a duration such as 30m, 1h30m or 90s")
    hours, minutes, seconds = (int(part[:-1]) if part else 0 for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds
