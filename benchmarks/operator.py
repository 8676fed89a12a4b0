"""Operator throughput and restart latency: the real operator process against the kmock API emulator.

1. `--runs` WMTPRuns are created at once → time until every first attempt's Job exists (and the throughput).
2. In `--failures` of those runs, one trainer pod fails → time until the next attempt's Job exists, per run:
   first one at a time (latency), then all at once (a burst). Target: p95 ≤ 5 s.

The emulator keeps everything in memory and scans all objects on every request, so absolute figures include
its cost and are pessimistic for a real API server; the driver and the emulator share one process.

    python benchmarks/operator.py [--runs 500] [--failures 50]
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the emulator harness is test support
from support.emulator import Emulator, OperatorProcess
from support.waiting import wait_for

NAMESPACE = "bench"
TARGET_P95_S = 5.0


def tiny_run() -> dict[str, Any]:
    documents = yaml.safe_load_all((Path(__file__).parents[1] / "configs" / "wmtprun.yaml").read_text())
    return next(doc for doc in documents if doc["kind"] == "WMTPRun")


class JobWatch:
    """When each Job of the namespace first appeared, from one watch stream: polling lists would load the
    emulator (which shares this process) far more than the operator does."""

    def __init__(self, api: Emulator) -> None:
        self.seen: dict[str, float] = {}
        url = urllib.parse.urlsplit(api.url)
        connection = http.client.HTTPConnection(url.hostname, url.port)
        connection.request("GET", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs?watch=true")
        self._socket = connection.sock  # kept: closing the response from another thread would not unblock it
        self._stream = connection.getresponse()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            event = json.loads(line)
            if event["type"] == "ADDED":
                self.seen.setdefault(event["object"]["metadata"]["name"], time.monotonic())

    def close(self) -> None:
        self._socket.shutdown(socket.SHUT_RDWR)

    def wait(self, names: list[str], timeout: float) -> list[float]:
        wait_for(lambda: all(name in self.seen for name in names), timeout=timeout, interval=0.05, what=names[0])
        return [self.seen[name] for name in names]


def create_runs(api: Emulator, jobs: JobWatch, count: int) -> tuple[list[str], float]:
    template, names = tiny_run(), [f"bench-{i:04d}" for i in range(count)]

    def create(name: str) -> None:
        body = copy.deepcopy(template)
        body["metadata"] = {"name": name, "namespace": NAMESPACE}
        api.create(body)

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))
    return names, max(jobs.wait([f"{name}-a1" for name in names], timeout=600)) - start


def attempt_pods(api: Emulator, job_name: str) -> list[dict[str, Any]]:
    """The pods the emulated Job controller created for that attempt (the kubelet runs them at once)."""
    return wait_for(lambda: len(pods := api.pods(NAMESPACE, job_name)) == 2 and pods, timeout=300, what=job_name)


def fail(api: Emulator, pod: dict[str, Any]) -> float:
    start = time.monotonic()
    api.exit(NAMESPACE, pod, 1)
    return start


def one_at_a_time(api: Emulator, jobs: JobWatch, pods: dict[str, list[dict[str, Any]]]) -> list[float]:
    latencies = []
    for run, names in pods.items():
        start = fail(api, names[1])
        latencies.append(jobs.wait([f"{run}-a2"], timeout=60)[0] - start)
    return latencies


def burst(api: Emulator, jobs: JobWatch, pods: dict[str, list[dict[str, Any]]]) -> list[float]:
    """A pod fails in every sampled run at once."""
    starts = {run: fail(api, names[0]) for run, names in pods.items()}
    seen = jobs.wait([f"{run}-a3" for run in starts], timeout=300)
    return [t - start for t, start in zip(seen, starts.values(), strict=True)]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def summary(name: str, values: list[float]) -> str:
    verdict = "OK" if p95(values) <= TARGET_P95_S else "OVER"
    return (
        f"{name:<42} n={len(values):<4} p50={statistics.median(values):6.3f} s  p95={p95(values):6.3f} s  "
        f"max={max(values):6.3f} s  {verdict} (target p95 ≤ {TARGET_P95_S:.0f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--failures", type=int, default=50, help="runs whose pods are failed (≤ --runs)")
    args = parser.parse_args()

    api = Emulator()
    operator = OperatorProcess(api, Path(tempfile.mkdtemp(prefix="wmtp-bench-")))
    jobs = JobWatch(api)
    try:
        runs, seconds = create_runs(api, jobs, args.runs)
        print(f"{args.runs} WMTPRuns created → every first attempt's Job exists after {seconds:.2f} s "
              f"({args.runs / seconds:.0f} runs/s)")  # fmt: skip
        sample = runs[: args.failures]
        pods = {run: attempt_pods(api, f"{run}-a1") for run in sample}
        wait_for(lambda: all(api.get("WMTPRun", NAMESPACE, r)["status"].get("phase") == "Running" for r in sample),
                 timeout=300, interval=0.5, what="the sampled runs to be Running")  # fmt: skip
        serial = one_at_a_time(api, jobs, pods)
        print(summary("pod failure → next attempt (serial)", serial))
        pods = {run: attempt_pods(api, f"{run}-a2") for run in sample}
        burst_latencies = burst(api, jobs, pods)
        print(summary(f"pod failure → next attempt (burst of {len(sample)})", burst_latencies))
        return 0 if max(p95(serial), p95(burst_latencies)) <= TARGET_P95_S else 1
    finally:
        jobs.close()
        operator.stop()
        api.close()


if __name__ == "__main__":
    sys.exit(main())
