"""Bounded fuzzing of what a user writes into a WMTPRun: the spec loader and the renderer raise only the project's
own errors (ConfigError, pydantic's ValidationError), and a reconcile pass raises nothing, whatever the spec,
status, state annotation or recipeRef ConfigMap say (a hostile recipe is Valid=False within 2 s); whatever rank 0
reports, the restart's timing and the ETA stay within what the operator saw."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from support import hostile
from wmtp import contract
from wmtp.config import MAX_MESSAGE, ConfigError
from wmtp_operator import render
from wmtp_operator.formats import DURATION
from wmtp_operator.plan import Observed
from wmtp_operator.reconcile import reconcile
from wmtp_operator.spec import Run
from wmtp_operator.state import STATE_ANNOTATION

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "wmtprun.yaml"
TINY_RUN = next(doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc and doc["kind"] == "WMTPRun")
TINY_RUN["metadata"].update(namespace="team-a", uid="0d2c1b7e-run-uid", generation=1)
HOSTILE_TEXT = st.sampled_from(
    ["", "$(AWS_SECRET_ACCESS_KEY)", "${HOME}", "../../etc", "/abs", "s3://", "s3://b/k", "file:///x", "step_12",
     "auto", "a" * 2000, "\x00", "é", "1e3", "8Gi", "lots", " x", "\n"]
)  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20) | HOSTILE_TEXT
KEYS = st.text(max_size=8) | HOSTILE_TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)
PATHS = st.sampled_from(
    ["image", "algorithm", "recipe", "recipe.train", "recipe.train.max_steps", "recipe.data.sources", "recipe.optim",
     "recipeRef", "models", "models.base", "models.ref", "datasets", "datasets.humaneval", "checkpoints",
     "checkpoints.basePath", "checkpoints.keepLast", "resume", "resumeFrom", "s3", "s3.endpointUrl", "mlflow",
     "mlflow.trackingUri", "mlflow.credentialsSecret", "devices", "devices.fsdp", "nodes", "nprocPerNode",
     "resources", "resources.limits", "nodeSelector", "tolerations", "serviceAccountName", "modelVolume",
     "modelVolume.size", "backoffLimit", "startupTimeout", "terminationGracePeriodSeconds", "suspend", "extra"]
)  # fmt: skip
EDITS = st.lists(st.tuples(PATHS, JSON), max_size=4)


def _edited(spec: dict[str, Any], edits: list[tuple[str, Any]]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for dotted, value in edits:
        *parents, last = dotted.split(".")
        node: Any = spec
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[last] = value
    return spec


@hostile.fuzz(1600)
@given(edits=EDITS, recipe_text=st.none() | st.text(max_size=200) | HOSTILE_TEXT)
def test_the_spec_loader_and_renderer_raise_only_the_projects_errors(
    edits: list[tuple[str, Any]], recipe_text: str | None
) -> None:
    body = {**TINY_RUN, "spec": _edited(TINY_RUN["spec"], edits)}
    def rendered() -> list[dict[str, Any]]:
        run = Run.from_body(body)
        return render.attempt_objects(run, render.trainer_files(run, recipe_text), 3)

    try:
        objects = hostile.bounded(rendered)
    except ConfigError as err:
        assert str(err)
        return
    except ValidationError:
        return
    json.dumps(objects)  # what goes to the API server is plain JSON


@hostile.fuzz(400)
@given(edits=EDITS, status=st.dictionaries(st.sampled_from(["phase", "report", "conditions", "step", "loss"]), JSON),
       state=st.none() | JSON | st.text(max_size=30))  # fmt: skip
def test_a_reconcile_pass_raises_nothing_and_says_little_whatever_it_reads(
    edits: list[tuple[str, Any]], status: dict[str, Any], state: Any
) -> None:
    body = {**TINY_RUN, "spec": _edited(TINY_RUN["spec"], edits), "status": status}
    if state is not None:
        body["metadata"] = {**body["metadata"], "annotations": {STATE_ANNOTATION: json.dumps(state)}}
    plan = hostile.bounded(lambda: reconcile(body, Observed(), "2026-01-02T03:04:05Z"))
    assert len(plan.status.get("message") or "") <= MAX_MESSAGE
    assert all(len(event.message) <= MAX_MESSAGE for event in plan.events)


@hostile.fuzz(200)
@given(text=hostile.documents(hostile.RECIPE))
def test_a_hostile_recipe_config_map_is_valid_false_in_time(text: str) -> None:
    body = {**TINY_RUN, "spec": {**TINY_RUN["spec"], "recipe": None, "recipeRef": {"name": "recipes"}}}
    del body["spec"]["recipe"]
    plan = hostile.bounded(lambda: reconcile(body, Observed(recipe_text=text), "2026-01-02T03:04:05Z"))
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "True" or len(valid["message"]) <= MAX_MESSAGE


NOW, ENDED = "2026-01-02T03:04:05Z", "2026-01-02T03:03:00Z"  # 65 s: no part of the restart may be longer
TIMES = st.sampled_from(
    ["2026-01-02T03:03:41Z", "2026-01-02T03:03:41.5+14:00", "2026-01-02T03:03:41-12:00", "9999-12-31T23:59:59Z",
     "0001-01-01T00:00:00Z", "2026-01-02T03:03:41", "2026-02-30T00:00:00Z", "yesterday"]
)  # fmt: skip
NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-(10**400), max_value=10**400)
REPORTS = st.fixed_dictionaries(
    {contract.REPORT_FIRST_STEP_AT: TIMES | SCALARS, **{key: NUMBERS | SCALARS for key in (
        contract.REPORT_RATE, contract.REPORT_LOAD_SECONDS, contract.REPORT_FIRST_STEP_SECONDS, "step")}}
)  # fmt: skip


def _child(kind: str, name: str, **status: Any) -> dict[str, Any]:
    uid = TINY_RUN["metadata"]["uid"]
    meta = {"name": name, "uid": f"uid-{name}", "creationTimestamp": "2026-01-02T03:03:03Z",
            "labels": {render.ATTEMPT_LABEL: "2", render.RUN_UID_LABEL: uid},
            "ownerReferences": [{"kind": "WMTPRun", "uid": uid, "controller": True}]}  # fmt: skip
    return {"kind": kind, "metadata": meta, "spec": {"completions": 1}, "status": status}


@hostile.fuzz(300)
@given(report=REPORTS)
def test_no_report_makes_the_operator_write_a_negative_or_endless_restart_or_eta(report: dict[str, Any]) -> None:
    ended = {"attempt": 1, "cause": "failure", "reason": "Error", "message": "m", "at": ENDED}
    record = {"attempt": 2, "restarts": 1, "startTime": ENDED, "previous": ended}
    meta = {**TINY_RUN["metadata"], "annotations": {STATE_ANNOTATION: json.dumps(record)}}
    body = {**TINY_RUN, "metadata": meta, "status": {"attempt": 2, "report": {**report, "attempt": 2}}}
    started = {"name": "trainer", "state": {"running": {"startedAt": "2026-01-02T03:03:23Z"}}}
    pods = [_child("Pod", "tiny-rho1-a2-0-x", phase="Running", containerStatuses=[started])]
    plan = hostile.bounded(lambda: reconcile(body, Observed([_child("Job", "tiny-rho1-a2")], pods), NOW))
    timed = plan.status.get("lastRestart") or {}
    assert all(0 <= value <= 66 for key, value in timed.items() if key.endswith("econds")), timed
    eta = plan.status.get("eta")
    assert eta is None or (re.fullmatch(DURATION, eta) and len(eta) <= 12), eta
