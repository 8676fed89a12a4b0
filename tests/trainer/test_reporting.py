"""Rank 0's progress reports to its WMTPRun's status, against a small local HTTP server."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from wmtp.contract import REPORTED_FIELDS, STOP_FAILED, STOP_PREEMPTED, TERMINATION_FIELDS, TERMINATION_MESSAGE_MAX
from wmtp.reporting import (
    RATE_WINDOW,
    Reporter,
    Termination,
    _process_age,
    read_termination,
    termination_log,
    write_termination,
)

STATUS_PATH = "/apis/wmtp.io/v1alpha1/namespaces/team-a/wmtpruns/tiny-rho1/status"


class ApiServer(http.server.ThreadingHTTPServer):
    """Records every request; answers with `status_code`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.status_code = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{STATUS_PATH}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ApiServer

    def do_PATCH(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(self.server.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_report_merge_patches_step_loss_and_checkpoint_with_the_service_account_token(
    api: ApiServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    reporter = Reporter(api.url, attempt=3, token_file=token)
    checkpoint = "s3://b/c/tiny-rho1/checkpoint_step_00001000"
    assert reporter.report(1000, 2.5, checkpoint)
    token.write_text("rotated-token")  # projected tokens rotate; the next request must use the new one
    assert reporter.report(1010, float("nan"))

    first, second = api.requests
    assert first["path"] == STATUS_PATH
    assert first["headers"]["Content-Type"] == "application/merge-patch+json"
    assert first["headers"]["Authorization"] == "Bearer first-token"
    # Only status.report, with every field, so that nothing of an older attempt's report survives the merge.
    unknown = dict.fromkeys(["stepsPerSecond", "firstStepAt", "loadSeconds", "firstStepSeconds"])
    assert first["body"] == {
        "status": {"report": {"attempt": 3, "step": 1000, "loss": 2.5, "latestCheckpoint": checkpoint, **unknown}}
    }
    assert set(first["body"]["status"]["report"]) == set(REPORTED_FIELDS)
    assert second["headers"]["Authorization"] == "Bearer rotated-token"
    # A NaN loss is not JSON: null. The newest checkpoint is repeated in every report.
    assert second["body"] == {
        "status": {"report": {"attempt": 3, "step": 1010, "loss": None, "latestCheckpoint": checkpoint, **unknown}}
    }


def test_the_first_step_is_reported_at_once_with_the_start_up_and_every_report_repeats_it(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]  # monotonic seconds
    monkeypatch.setattr("wmtp.reporting._process_age", lambda: 20.0)
    monkeypatch.setattr("wmtp.reporting.time.monotonic", lambda: clock[0])
    reporter = Reporter(api.url, attempt=2)  # the process started 20 s before
    clock[0] = 130.0
    reporter.loaded()
    clock[0] = 134.0
    reporter.step_done(1001, 2.5)  # reported at once
    reporter.step_done(1002, 2.4)  # not reported: the periodic reports carry the rest
    clock[0] = 300.0
    reporter.report(1010, 2.3)  # nine steps in 166 s since the first step
    first, later = (r["body"]["status"]["report"] for r in api.requests)
    assert first["step"] == 1001 and (first["loadSeconds"], first["firstStepSeconds"]) == (50.0, 4.0)
    assert datetime.fromisoformat(first["firstStepAt"].replace("Z", "+00:00")).tzinfo is not None
    assert first["stepsPerSecond"] is None  # one point is no rate
    assert {k: later[k] for k in ("firstStepAt", "loadSeconds", "firstStepSeconds")} == {
        k: first[k] for k in ("firstStepAt", "loadSeconds", "firstStepSeconds")
    }
    assert later["stepsPerSecond"] == pytest.approx(9 / 166, rel=1e-4)


def test_the_rate_spans_the_last_reports_since_the_first_step(api: ApiServer) -> None:
    reporter = Reporter(api.url)
    reporter.report(500)  # before the first step (the resumed checkpoint's report): start-up is no part of it
    assert reporter.rate() is None
    reporter.step_done(501, 1.0)
    for step in range(510, 600, 10):
        reporter.report(step, 1.0)
    assert reporter.rate() is not None and reporter.rate() > 0
    assert reporter._points[0][0] == 590 - 10 * (RATE_WINDOW - 1)


def test_start_up_counts_from_the_start_of_the_process() -> None:
    assert 0.0 < _process_age() < time.clock_gettime(time.CLOCK_BOOTTIME)  # this test's process, from /proc


def test_a_failed_report_warns_once_never_raises_and_pauses_step_reports_but_not_checkpoints(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.status_code = 403
    reporter = Reporter(api.url, backoff_s=60)
    with caplog.at_level(logging.DEBUG, logger="wmtp.reporting"):
        assert reporter.report(10, 1.0) is False
        assert reporter.report(20, 1.0) is False  # paused: no request at all
        assert reporter.report(30, 1.0, "s3://b/c/run/checkpoint_step_00000030") is False  # still tried
    assert [r["body"]["status"]["report"]["step"] for r in api.requests] == [10, 30]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "403" in warnings[0].getMessage()

    api.status_code = 200
    assert reporter.report(40, 1.0, "s3://b/c/run/checkpoint_step_00000040") is True
    assert reporter.report(50, 0.9) is True  # a success ends the pause


def test_an_unreachable_api_server_costs_a_warning_not_the_training_run() -> None:
    server = ApiServer()
    url = server.url
    server.server_close()  # nothing listens there any more
    assert Reporter(url, timeout_s=1).report(1, 1.0, "s3://b/c") is False


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, None),  # not under the operator
        ({"WMTP_RUN_NAME": "tiny-rho1"}, None),  # not in a pod
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),  # a pod, but not a run's
        (
            {
                "WMTP_RUN_NAME": "tiny-rho1",
                "WMTP_RUN_NAMESPACE": "team-a",
                "KUBERNETES_SERVICE_HOST": "10.0.0.1",
                "WMTP_ATTEMPT": "2",
            },
            f"https://10.0.0.1:443{STATUS_PATH}",
        ),
        (
            {"WMTP_RUN_NAME": "tiny-rho1", "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"},
            f"https://[fd00::1]:6443{STATUS_PATH}",  # namespace from the service account
        ),
    ],
)
def test_from_env_finds_the_run_and_the_api_server_of_the_pod(
    env: dict[str, str], url: str | None, tmp_path: Path
) -> None:
    (tmp_path / "namespace").write_text("team-a")
    (tmp_path / "token").write_text("t")
    reporter = Reporter.from_env(env, service_account=tmp_path)
    assert (reporter.url if reporter else None) == url
    if reporter:
        assert reporter.token_file == tmp_path / "token"
        assert reporter.attempt == (2 if "WMTP_ATTEMPT" in env else None)


def test_the_termination_message_round_trips_with_the_contract_fields(tmp_path: Path) -> None:
    ended = Termination(STOP_PREEMPTED, 75, "stopped at step 12", 12, "s3://b/run/checkpoint_step_00000012", ["w"])
    path = write_termination(ended, tmp_path / "termination-log")
    assert set(json.loads(path.read_bytes())) == set(TERMINATION_FIELDS)
    assert read_termination(path) == ended
    assert read_termination(tmp_path / "absent") is None
    (tmp_path / "garbage").write_bytes(b"{not json")
    assert read_termination(tmp_path / "garbage") is None


def test_the_termination_message_never_exceeds_what_the_kubelet_keeps() -> None:
    warnings = [f"warning {i}: " + "x" * 400 for i in range(30)]
    ended = Termination(STOP_FAILED, 1, "boom " * 2000, 5, "file:///c/" + "d" * 3000, warnings)
    data = ended.to_json()
    assert len(data) <= TERMINATION_MESSAGE_MAX
    parsed = json.loads(data)
    assert parsed["reason"] == STOP_FAILED and parsed["step"] == 5 and parsed["message"].startswith("boom")
    assert parsed["warnings"][-1].endswith("more warnings)") and parsed["warnings"][0].startswith("warning 0")


def test_the_termination_log_is_the_variable_else_the_kubernetes_file_when_writable(tmp_path: Path) -> None:
    assert termination_log({"WMTP_TERMINATION_LOG": str(tmp_path / "t")}) == tmp_path / "t"
    expected = Path("/dev/termination-log")
    assert termination_log({}) == (expected if expected.is_file() and os.access(expected, os.W_OK) else None)
