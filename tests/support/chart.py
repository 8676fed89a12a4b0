"""The Helm chart rendered by the real helm binary that `make setup` installs, for the chart and scanner tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wmtp"
HELM = Path(sys.executable).with_name("helm")
NAMESPACED = ["--set", "watch.clusterWide=false", "--set", "watch.namespaces={team-a,team-b}"]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM.exists(), f"{HELM} is missing: `make setup` installs it"
    return subprocess.run([str(HELM), *args], capture_output=True, text=True)


def render(*values: str) -> list[dict[str, Any]]:
    result = helm("template", "wmtp", str(CHART), "--namespace", "wmtp-system", "--include-crds", *values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) → verbs a Role or ClusterRole grants."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted
