"""`wmtp-operator`'s command line: watch scope, liveness endpoint, peering."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from wmtp_operator.__main__ import main


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
    for name in ("WMTP_OPERATOR_NAMESPACES", "WMTP_OPERATOR_STANDALONE", "WMTP_OPERATOR_LIVENESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **_: None)  # leave the test process's logging alone
    main(argv)
    (kwargs,) = calls
    assert {key: kwargs[key] for key in expected} == expected
