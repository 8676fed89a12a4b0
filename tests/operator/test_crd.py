"""The WMTPRun CRD: generated from the spec models, self-documenting, and admitting exactly the valid runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from wmtp_operator import crd, render
from wmtp_operator.formats import RECIPE
from wmtp_operator.sections import MAX_TAG_KEY
from wmtp_operator.spec import Run, Spec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "wmtpruns.yaml"


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every Kubernetes object in configs/*.yaml."""
    return [
        (path.name, doc)
        for path in sorted((ROOT / "configs").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]


def test_crd_file_is_generated_from_the_spec_models() -> None:
    # Regenerate with: .venv/bin/python -m wmtp_operator.crd > crds/wmtpruns.yaml (or WMTP_REGENERATE=1 pytest).
    if os.environ.get("WMTP_REGENERATE"):
        CRD_FILE.write_text(crd.render())
    assert CRD_FILE.read_text() == crd.render(), "crds/wmtpruns.yaml is stale: regenerate it from spec.py"


def test_crd_is_a_valid_custom_resource_definition(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def _fields(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _fields(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _fields(schema["additionalProperties"], f"{path}.<key>")
    if "items" in schema:
        found += _fields(schema["items"], f"{path}[]")
    return found


def test_every_field_has_a_description_for_kubectl_explain(run_schema: dict[str, Any]) -> None:
    fields = _fields(run_schema, "wmtprun")
    # Map values (<key>) are explained by their map's description, as in the built-in kinds.
    undocumented = [path for path, schema in fields if not schema.get("description") and "<key>" not in path]
    assert len(fields) > 60
    assert undocumented == []


def test_schema_is_structural(run_schema: dict[str, Any]) -> None:
    for path, schema in _fields(run_schema, "wmtprun"):
        assert "type" in schema or schema.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & set(schema), path


def test_printer_columns_show_progress_and_loss_and_wide_adds_checkpoint_message_and_preemptions(
    crd: dict[str, Any],
) -> None:
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: (c["jsonPath"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": (".status.phase", 0),
        "Algorithm": (".spec.algorithm", 0),
        "Progress": (".status.progress", 0),
        "Loss": (".status.loss", 0),
        "Restarts": (".status.restarts", 0),
        "Age": (".metadata.creationTimestamp", 0),
        "Preemptions": (".status.preemptions", 1),
        "Checkpoint": (".status.latestCheckpoint", 1),
        "Message": (".status.message", 1),
        "Eval": (".status.eval.message", 1),
    }
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] == ["wr"]


def test_status_schema_keeps_the_trainers_report(run_schema: dict[str, Any]) -> None:
    # A structural schema prunes what it does not declare: without `report`, rank 0's reports would vanish.
    report = run_schema["properties"]["status"]["properties"]["report"]["properties"]
    assert set(report) == {"attempt", "step", "loss", "latestCheckpoint"}


EXAMPLES = example_documents()
RUNS = [(name, doc) for name, doc in EXAMPLES if doc["kind"] == "WMTPRun"]


@pytest.mark.parametrize(("source", "body"), RUNS, ids=[f"{n}:{d['metadata']['name']}" for n, d in RUNS])
def test_example_runs_are_admitted_and_render(
    source: str, body: dict[str, Any], admit: Callable[[dict[str, Any]], list[str]]
) -> None:
    assert admit(body) == []
    run = Run.from_body({**body, "metadata": {**body["metadata"], "namespace": "default", "uid": "u"}})
    files = render.trainer_files(run)
    assert files.recipe.train.algo == run.spec.algorithm


OTHERS = [(name, doc) for name, doc in EXAMPLES if doc["kind"] != "WMTPRun"]


@pytest.mark.parametrize(("source", "doc"), OTHERS, ids=[f"{n}:{d['kind']}" for n, d in OTHERS])
def test_other_example_objects_pass_kubernetes_validate(source: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_crd_defaults_match_the_operators_defaults(
    crd_defaults: Callable[[dict[str, Any]], dict[str, Any]], make_run: Callable[..., Any]
) -> None:
    body = make_run(**{"spec.s3": None, "spec.mlflow": None, "spec.resume": None, "spec.backoffLimit": None})
    server_side = Spec.model_validate(crd_defaults(body)["spec"])
    assert server_side == Spec.model_validate(body["spec"])
    assert server_side.resume == "auto" and server_side.backoff_limit == 3 and server_side.mlflow.experiment == "wmtp"


# (overrides of the tiny example, the message the API server answers with)
INVALID = [
    ({"spec.models.ref": None}, "models.ref is required when algorithm is rho1-wmtp"),
    (
        {"spec.algorithm": "critic-wmtp", "spec.recipe.rho1": None},
        "models.rm is required when algorithm is critic-wmtp",
    ),
    ({"spec.nodes": 0}, "nodes must be at least 1"),
    ({"spec.resume": "yesterday"}, "resume must be auto, never, latest, step_N, or a checkpoint URI"),
    ({"spec.resume": "step_x"}, "resume must be auto, never, latest, step_N, or a checkpoint URI"),
    ({"spec.resumeFrom": "http://x/ckpt"}, "resumeFrom must be a checkpoint URI"),
    ({"spec.recipeRef": {"name": "recipes"}}, "set exactly one of recipe (inline) and recipeRef (a ConfigMap)"),
    ({"spec.recipe": None}, "set exactly one of recipe (inline) and recipeRef (a ConfigMap)"),
    ({"spec.modelVolume": {"type": "persistentVolumeClaim"}}, "modelVolume.size is required"),
    ({"spec.checkpoints.basePath": "checkpoints"}, "checkpoints.basePath must be s3://"),
    ({"metadata.name": "r" * 49}, "metadata.name must be at most 48 characters"),
    ({"metadata.name": "tiny.rho1"}, "metadata.name must be a DNS-1035 label"),
    ({"metadata.name": "1run"}, "metadata.name must be a DNS-1035 label"),
    ({"metadata.name": "run-$(X)"}, "metadata.name must be a DNS-1035 label"),
    ({"spec.eval": {"tasks": ["mbpp"]}}, "eval.datasets.mbpp is required when eval.tasks lists mbpp"),
    ({"spec.eval": {"k": [1, 10], "samples": 5}}, "eval.k: every k of pass@k must be at most eval.samples"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_runs_are_rejected_with_the_cel_message(
    overrides: dict[str, Any], message: str, make_run: Callable[..., Any], admit: Callable[[dict[str, Any]], list[str]]
) -> None:
    problems = admit(make_run(**overrides))
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"spec.algorithm": "gpt"}, "spec.algorithm: 'gpt' is not one of"),
        ({"spec.nodes": "two"}, "spec.nodes: 'two' is not of type 'integer'"),
        ({"spec.gpus": 8}, "Additional properties are not allowed ('gpus' was unexpected)"),
        ({"spec.image": None}, "'image' is a required property"),
        ({"spec.image": " ghcr.io/wmtp/trainer:0.1.0"}, "spec.image: ' ghcr.io/wmtp/trainer:0.1.0' does not match"),
        ({"spec.image": "ghcr.io/wmtp/trainer:$(TAG)"}, "spec.image: 'ghcr.io/wmtp/trainer:$(TAG)' does not match"),
        ({"spec.resources.limits": {"cpu": "lots"}}, "spec.resources.limits.cpu: 'lots' does not match"),
        ({"spec.modelVolume": {"size": "80 Gi"}}, "spec.modelVolume.size: '80 Gi' does not match"),
        ({"spec.s3.credentialsSecret": "../s3"}, "spec.s3.credentialsSecret: '../s3' does not match"),
        ({"spec.mlflow.credentialsSecret": "Auth"}, "spec.mlflow.credentialsSecret: 'Auth' does not match"),
        ({"spec.recipeRef": {"name": "r", "key": "a/b"}, "spec.recipe": None}, "spec.recipeRef.key: 'a/b' does not"),
        ({"spec.serviceAccountName": "x y"}, "spec.serviceAccountName: 'x y' does not match"),
        ({"spec.startupTimeout": "soon"}, "spec.startupTimeout: 'soon' does not match"),
        ({"spec.terminationGracePeriodSeconds": 1}, "spec.terminationGracePeriodSeconds: 1 is less than"),
        ({"spec.devices": {"mixedPrecision": "fp8"}}, "spec.devices.mixedPrecision: 'fp8' is not one of"),
        ({"spec.eval": {"tasks": ["gsm8k"]}}, "spec.eval.tasks.0: 'gsm8k' is not one of"),
        ({"spec.eval": {"timeout": "forever"}}, "spec.eval.timeout: 'forever' does not match"),
        ({"spec.eval": {"temperature": 0}}, "spec.eval.temperature: 0 is less than"),
    ],
)
def test_schema_rejects_wrong_types_enums_and_unknown_fields(
    overrides: dict[str, Any], fragment: str, make_run: Callable[..., Any], admit: Callable[[dict[str, Any]], list[str]]
) -> None:
    problems = admit(make_run(**overrides))
    assert any(fragment in problem for problem in problems), problems


def test_valid_resume_forms_are_admitted(
    make_run: Callable[..., Any], admit: Callable[[dict[str, Any]], list[str]]
) -> None:
    for resume in ("auto", "never", "latest", "step_1000", "s3://bkt/ckpt/run/checkpoint_step_00001000", "/mnt/c"):
        assert admit(make_run(**{"spec.resume": resume})) == [], resume


# (the edit of a stored run, the message naming the field)
IMMUTABLE = [
    ({"spec.algorithm": "baseline-mtp"}, "spec.algorithm is immutable"),
    ({"spec.models.base": "s3://wmtp/models/other"}, "spec.models is immutable"),
    ({"spec.models.rm": "s3://wmtp/models/rm"}, "spec.models is immutable"),
    ({"spec.datasets.extra": "s3://wmtp/x.jsonl"}, "spec.datasets is immutable"),
    ({"spec.checkpoints.basePath": "s3://elsewhere"}, "spec.checkpoints.basePath is immutable"),
    ({"spec.recipe": None, "spec.recipeRef": {"name": "r"}}, "spec.recipe and spec.recipeRef are immutable"),
]


@pytest.mark.parametrize(("overrides", "message"), IMMUTABLE, ids=[m for _, m in IMMUTABLE])
def test_what_defines_the_training_is_immutable(
    overrides: dict[str, Any], message: str, make_run: Callable[..., Any], admit: Callable[..., list[str]]
) -> None:
    assert admit(make_run(**overrides)) == []  # as a new run, each is fine
    problems = admit(make_run(**overrides), old=make_run())
    assert any(message in problem for problem in problems), problems


def test_operational_fields_may_change_on_a_running_run(
    make_run: Callable[..., Any], admit: Callable[..., list[str]]
) -> None:
    edited = make_run(
        **{
            "spec.image": "ghcr.io/wmtp/trainer:0.2.0",
            "spec.nodes": 4,
            "spec.resources.limits": {"cpu": 8, "memory": "16Gi"},
            "spec.checkpoints.saveInterval": 50,
            "spec.checkpoints.keepLast": 5,
            "spec.backoffLimit": 9,
            "spec.suspend": True,
        }
    )
    assert admit(edited, old=make_run()) == []


def _largest(schema: dict[str, Any]) -> int:
    """Characters of the largest compact JSON value `schema` admits; KeyError where it admits any size."""
    if "enum" in schema:
        return max(len(json.dumps(value)) for value in schema["enum"])
    kind = schema["type"]
    if kind == "string":
        return schema["maxLength"] + 2
    if kind in ("integer", "number", "boolean"):
        return 24  # an int64 has 20 characters, a float's shortest repr at most 24
    if kind == "array":
        return 2 + schema["maxItems"] * (_largest(schema["items"]) + 1)
    size = 2 + sum(len(json.dumps(name)) + 2 + _largest(sub) for name, sub in schema.get("properties", {}).items())
    if "additionalProperties" in schema:  # map keys: the CEL rule bounds them
        size += schema["maxProperties"] * (MAX_TAG_KEY + 4 + _largest(schema["additionalProperties"]))
    return size


def test_the_inline_recipe_is_bounded_by_its_schema_to_what_the_operator_reads(run_schema: dict[str, Any]) -> None:
    # Every string, list and map of spec.recipe is bounded, so the API server itself keeps a recipe under the
    # operator's limit: no CEL rule has to measure it.
    recipe = run_schema["properties"]["spec"]["properties"]["recipe"]
    assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(recipe)
    assert _largest(recipe) <= RECIPE.max_bytes, _largest(recipe)
    tags = recipe["properties"]["run"]["properties"]["tags"]
    assert f"size(k) <= {MAX_TAG_KEY}" in tags["x-kubernetes-validations"][0]["rule"]
