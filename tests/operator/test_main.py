"""`wmtp-operator`'s command line: watch scope, liveness endpoint, peering, metrics port."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from wmtp_operator import metrics
from wmtp_operator.__main__ import METRICS_PORT, main


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, {"clusterwide": True, "namespaces": [], "standalone": None}),
        (["-n", "team-a", "--namespace", "team-b"], {}, {"clusterwide": False, "namespaces": ["team-a", "team-b"]}),
        (
            [],
            {"WMTP_OPERATOR_NAMESPACES": "team-a, team-*"},
            {"clusterwide": False, "namespaces": ["team-a", "team-*"]},
        ),
        (["-n", "x"], {"WMTP_OPERATOR_NAMESPACES": "y"}, {"namespaces": ["x"]}),  # the flag wins
        (["--standalone"], {}, {"standalone": True}),
        ([], {"WMTP_OPERATOR_STANDALONE": "true"}, {"standalone": True}),
        ([], {}, {"liveness_endpoint": "http://0.0.0.0:8080/healthz"}),
        (["--liveness", "http://127.0.0.1:9/healthz"], {}, {"liveness_endpoint": "http://127.0.0.1:9/healthz"}),
    ],
)
def test_scope_liveness_and_peering_come_from_flags_then_environment(
    argv: list[str], env: dict[str, str], expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WMTP_OPERATOR_NAMESPACES", "WMTP_OPERATOR_STANDALONE", "WMTP_OPERATOR_LIVENESS",
                 "WMTP_OPERATOR_METRICS_PORT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **_: None)  # leave the test process's logging alone
    monkeypatch.setattr(metrics, "serve", lambda port: None)
    main(argv)
    (kwargs,) = calls
    assert {key: kwargs[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("argv", "env", "served"),
    [
        ([], {}, [METRICS_PORT]),
        (["--metrics-port", "9102"], {}, [9102]),
        (["--metrics-port=0"], {}, []),
        ([], {"WMTP_OPERATOR_METRICS_PORT": "9103"}, [9103]),
        ([], {"WMTP_OPERATOR_METRICS_PORT": "0"}, []),
    ],
)
def test_metrics_are_served_on_their_port_unless_it_is_0(
    argv: list[str], env: dict[str, str], served: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WMTP_OPERATOR_METRICS_PORT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ports: list[int] = []
    monkeypatch.setattr(kopf, "run", lambda **_: None)
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    monkeypatch.setattr(metrics, "serve", ports.append)
    main(argv)
    assert ports == served


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_metrics_port_that_is_no_port_is_refused(port: str) -> None:
    with pytest.raises(SystemExit):
        main(["--metrics-port", port])
