"""The loader fuzz of `make test`, run longer: every fuzz test's examples times `--scale`, same bounds per case.

The fuzz tests (tests/trainer/test_config_fuzz.py, tests/operator/test_fuzz.py) try the config, recipe and pull-spec
loaders, the WMTPRun spec loader and renderer, and a reconcile pass against hostile documents and data; each case
must end in the project's own error (exit 2 for a CLI, never 1) within 2 s of CPU, raising the peak resident
memory by less than 200 MB (`support.hostile.bounded`). `make test` runs them at scale 1 (a few thousand cases);
this runs them at `--scale` with hypothesis's statistics on, and prints the cases tried, the wall time and the
slowest test. Derandomized: scale N tries the cases of scale 1 and more.

    python benchmarks/fuzz.py [--scale 20]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/trainer/test_config_fuzz.py", "tests/operator/test_fuzz.py"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20, help="examples per fuzz test, times make test's")
    args = parser.parse_args()
    env = {**os.environ, "WMTP_FUZZ_SCALE": str(args.scale)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    started = time.perf_counter()
    done = subprocess.run([*command, *FILES], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    counts = re.findall(r"(\d+) passing, (\d+) failing", output)
    cases, failing = sum(int(p) for p, _ in counts), sum(int(f) for _, f in counts)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    verdict = re.findall(r"^=* ?(\d+ passed.*?|\d+ failed.*?) ?=*$", output, re.MULTILINE)
    verdict = verdict[-1] if verdict else f"exit {done.returncode}"
    print(f"scale {args.scale}: {cases} cases passed, {failing} failing, in {seconds:.0f} s wall; "
          f"the pytest process's peak RSS {peak_mb:.0f} MB; pytest: {verdict}")  # fmt: skip
    if done.returncode != 0:
        print(output[-5000:])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
