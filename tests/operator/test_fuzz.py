"""Bounded fuzzing of what a user writes into a WMTPRun: the spec loader and the renderer raise only the project's
own errors (ConfigError, pydantic's ValidationError), and a reconcile pass raises nothing, whatever the spec,
status, state annotation or recipeRef ConfigMap say (a hostile recipe is Valid=False within 2 s)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from support import hostile
from wmtp.config import MAX_MESSAGE, ConfigError
from wmtp_operator import render
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


@settings(max_examples=1600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDITS, recipe_text=st.none() | st.text(max_size=200) | HOSTILE_TEXT)
def test_the_spec_loader_and_renderer_raise_only_the_projects_errors(
    edits: list[tuple[str, Any]], recipe_text: str | None
) -> None:
    body = {**TINY_RUN, "spec": _edited(TINY_RUN["spec"], edits)}
    try:
        run = Run.from_body(body)
        files = render.trainer_files(run, recipe_text)
        objects = render.attempt_objects(run, files, 3)
    except ConfigError as err:
        assert str(err)
        return
    except ValidationError:
        return
    json.dumps(objects)  # what goes to the API server is plain JSON


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDITS, status=st.dictionaries(st.sampled_from(["phase", "report", "conditions", "step", "loss"]), JSON),
       state=st.none() | JSON | st.text(max_size=30))  # fmt: skip
def test_a_reconcile_pass_raises_nothing_and_says_little_whatever_it_reads(
    edits: list[tuple[str, Any]], status: dict[str, Any], state: Any
) -> None:
    body = {**TINY_RUN, "spec": _edited(TINY_RUN["spec"], edits), "status": status}
    if state is not None:
        body["metadata"] = {**body["metadata"], "annotations": {STATE_ANNOTATION: json.dumps(state)}}
    plan = reconcile(body, Observed(), "2026-01-02T03:04:05Z")
    assert len(plan.status.get("message") or "") <= MAX_MESSAGE
    assert all(len(event.message) <= MAX_MESSAGE for event in plan.events)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=hostile.documents(hostile.RECIPE))
def test_a_hostile_recipe_config_map_is_valid_false_in_time(text: str) -> None:
    body = {**TINY_RUN, "spec": {**TINY_RUN["spec"], "recipe": None, "recipeRef": {"name": "recipes"}}}
    del body["spec"]["recipe"]
    started = time.process_time()  # CPU: the machine running the tests is shared
    plan = reconcile(body, Observed(recipe_text=text), "2026-01-02T03:04:05Z")
    assert time.process_time() - started < 2.0
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "True" or len(valid["message"]) <= MAX_MESSAGE
