"""`make e2e-kind` as a test: runs where Docker and kind exist, reported as skipped (never passed) elsewhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("kind.sh")
SKIPPED = 77


@pytest.mark.slow
def test_kind_end_to_end() -> None:
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    if result.returncode == SKIPPED:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "PASSED" in result.stdout
