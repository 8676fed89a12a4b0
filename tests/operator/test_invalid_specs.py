"""Every invalid WMTPRun is refused before a pod runs: by the CRD (schema and CEL, as the API server evaluates them)
where a rule can say it, else by the operator (`Valid=False`, nothing created). One table row per spec, with the
layer that refuses it first; no row passes both.

The API server's side is `admit` (conftest): the CRD's openAPIV3Schema with jsonschema, unknown fields refused as
kubectl's strict field validation does, and the `x-kubernetes-validations` with cel-python. The operator's side is
one reconcile pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from wmtp.checkpoint import step_dir_name
from wmtp_operator.plan import Create, Observed
from wmtp_operator.reconcile import reconcile

NOW = "2026-01-02T03:04:05Z"
CRD, OPERATOR = "crd", "operator"
DATASETS = {"humaneval": "s3://wmtp/datasets/HumanEval.jsonl.gz"}
GOOD_RECIPE = "train: {max_steps: 60}\ndata: {sources: [{name: humaneval}]}\n"


@dataclass(frozen=True)
class Row:
    name: str
    overrides: dict[str, Any]
    layer: str  # the first layer that refuses it
    recipe_text: str | None = None  # a recipeRef ConfigMap's content (the CRD never sees it)
    ignored: bool = False  # the operator goes on without the value (a Warning and Valid=False say so)
    crd_only: str = ""  # why the operator alone would let it pass


def row(
    name: str, layer: str, recipe_text: str | None = None, ignored: bool = False, crd_only: str = "", **overrides: Any
) -> Row:
    fields = {key.replace("__", "."): value for key, value in overrides.items()}
    return Row(name, fields, layer, recipe_text, ignored, crd_only)


# Why the CRD refuses a few specs that the operator would take: it reads the value a user meant (pydantic's lax
# types: yes → true), a bound of the CRD tighter than the trainer's own (to keep the object small), a value the
# operator replaces anyway.
COERCED = "pydantic reads it as the value meant"
TIGHTER = "the CRD keeps the object small, tighter than the trainer's own bound"


REF = {"spec__recipe": None, "spec__recipeRef": {"name": "recipes"}}  # the recipe from a ConfigMap


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


TYPES = [
    row("nodes a word", CRD, spec__nodes="two"),
    row("nodes a float", CRD, spec__nodes=1.5),
    row("nodes a bool", CRD, crd_only=COERCED, spec__nodes=True),
    row("image a number", CRD, spec__image=5),
    row("algorithm a number", CRD, spec__algorithm=1),
    row("suspend a word", CRD, crd_only=COERCED, spec__suspend="yes"),
    row("backoffLimit a string", CRD, crd_only=COERCED, spec__backoffLimit="3"),
    row("datasets a list", CRD, spec__datasets=["s3://wmtp/x.jsonl"]),
    row("models a string", CRD, spec__models="s3://wmtp/models/base"),
    row("recipe a list", CRD, spec__recipe=[1]),
    row("limits a list", CRD, spec__resources={"limits": ["cpu"]}),
    row("tolerations a mapping", CRD, spec__tolerations={"key": "x"}),
    row("eval a list", CRD, spec__eval=["humaneval"]),
    row("saveInterval a word", CRD, spec__checkpoints__saveInterval="often"),
    row("activation checkpointing a word", CRD, crd_only=COERCED,
        spec__devices={"fsdp": {"activationCheckpointing": "no"}}),
    row("nodeSelector a list", CRD, spec__nodeSelector=["gpu"]),
    row("an unknown spec field", CRD, spec__gpus=8),
    row("an unknown recipe key", CRD, spec__recipe__trian={"max_steps": 1}),
    row("an unknown recipe field", CRD, spec__recipe__optim={"learning_rate": 0.1}),
    row("a recipe without data", CRD, spec__recipe={"train": {"max_steps": 5}}),
    row("lr a list (a deep recipe)", CRD, spec__recipe__optim={"lr": nested(60)}),
]
BOUNDS = [
    row("nodes 0", CRD, spec__nodes=0),
    row("nodes past the pod names", CRD, spec__nodes=10_000),
    row("nprocPerNode 0", CRD, spec__nprocPerNode=0),
    row("nprocPerNode 65", CRD, spec__nprocPerNode=65),
    row("backoffLimit -1", CRD, spec__backoffLimit=-1),
    row("backoffLimit 1001", CRD, spec__backoffLimit=1001),
    row("grace 5 s", CRD, spec__terminationGracePeriodSeconds=5),
    row("grace over a day", CRD, spec__terminationGracePeriodSeconds=100_000),
    row("ttl -1", CRD, spec__ttlSecondsAfterFinished=-1),
    row("ttl past int32", CRD, spec__ttlSecondsAfterFinished=2**31),
    row("saveInterval 0", CRD, spec__checkpoints__saveInterval=0),
    row("keepLast 0", CRD, spec__checkpoints__keepLast=0),
    row("distributed timeout 0", CRD, spec__devices={"distributed": {"timeoutS": 0}}),
    row("distributed timeout over a day", CRD, spec__devices={"distributed": {"timeoutS": 86_401}}),
    row("eval samples 0", CRD, spec__eval={"samples": 0}),
    row("eval k 0", CRD, spec__eval={"k": [0]}),
    row("eval temperature 0", CRD, spec__eval={"temperature": 0}),
    row("eval maxNewTokens 9000", CRD, spec__eval={"maxNewTokens": 9000}),
    row("eval nine ks", CRD, spec__eval={"k": [1] * 9, "samples": 5}),
    row("lr 0", CRD, spec__recipe__optim={"lr": 0}),
    row("lr 2", CRD, spec__recipe__optim={"lr": 2}),
    row("one beta", CRD, spec__recipe__optim={"betas": [0.9]}),
    row("a beta of 1", CRD, spec__recipe__optim={"betas": [1, 0.9]}),
    row("warmup ratio 1", CRD, spec__recipe__optim={"warmup_ratio": 1}),
    row("max_length 4", CRD, spec__recipe__data={"sources": [{"name": "humaneval"}], "max_length": 4}),
    row("batch size 0", CRD, spec__recipe__data={"sources": [{"name": "humaneval"}], "batch_size": 0}),
    row("eval fraction 1", CRD, spec__recipe__data={"sources": [{"name": "humaneval"}], "eval_fraction": 1}),
    row("no sources", CRD, spec__recipe__data={"sources": []}),
    row("17 heads", CRD, spec__recipe__loss={"n_heads": 17}),
    row("temperature 0", CRD, spec__recipe__loss={"temperature": 0}),
    row("k_percent 0", CRD, spec__recipe__rho1={"k_percent": 0}),
    row("21 tags", CRD, crd_only=TIGHTER, spec__recipe__run={"tags": {f"t{i}": "x" for i in range(21)}}),
    row("a tag value of 501", CRD, crd_only=TIGHTER, spec__recipe__run={"tags": {"t": "x" * 501}}),
    row("a tag key of 251", CRD, spec__recipe__run={"tags": {"t" * 251: "x"}}),
    row("a recipe of 0.9 MB", CRD, spec__recipe__run={"tags": {f"t{i}": "x" * 4000 for i in range(225)}}),
    row("33 sources", CRD, spec__recipe__data={"sources": [{"name": "humaneval"}] * 33}),
    row("5 languages", CRD, spec__recipe__data={"sources": [{"name": "humaneval", "languages": ["cpp"] * 5}]}),
]
URIS = [
    row("a model of no bucket", CRD, spec__models__base="s3://"),
    row("a model in a bad bucket", CRD, spec__models__base="s3://Bad_Bucket!/x"),
    row("a model bucket of 2", CRD, spec__models__base="s3://ab/models/base"),
    row("a model bucket of 64", CRD, spec__models__base=f"s3://{'b' * 64}/models/base"),
    row("a model of no key", CRD, spec__models__base="s3://wmtp"),
    row("a relative model path", CRD, spec__models__base="models/base"),
    row("a model path climbing out", CRD, spec__models__base="/models/../../etc"),
    row("a model key climbing out", CRD, spec__models__base="s3://wmtp/models/../../x"),
    row("a model of another scheme", CRD, spec__models__base="gs://wmtp/models/base"),
    row("a model over http", CRD, spec__models__base="http://models.example/base"),
    row("a model at a file host", CRD, spec__models__base="file://host/models/base"),
    row("a model of an empty segment", CRD, spec__models__base="s3://wmtp/models//base"),
    row("a model with a control character", CRD, spec__models__base="/models/\x1bbase"),
    row("a model with credentials", CRD, spec__models__base="s3://user:pass@wmtp/models/base"),
    row("a reference model climbing out", CRD, spec__models__ref="/models/../ref"),
    row("a dataset climbing out", CRD, spec__datasets__humaneval="s3://wmtp/datasets/../../x.jsonl"),
    row("a dataset path climbing out", CRD, spec__datasets__humaneval="/data/../etc/passwd"),
    row("a relative dataset", CRD, spec__datasets__humaneval="HumanEval.jsonl.gz"),
    row("a dataset of no key", CRD, spec__datasets__humaneval="s3://wmtp/"),
    row("basePath climbing out", CRD, spec__checkpoints__basePath="s3://wmtp/ckpt/.."),
    row("basePath relative", CRD, spec__checkpoints__basePath="checkpoints"),
    row("basePath in a bad bucket", CRD, spec__checkpoints__basePath="s3://UPPER/ckpt"),
    row("basePath file climbing out", CRD, spec__checkpoints__basePath="file:///a/../b"),
    row("endpointUrl not a URL", CRD, spec__s3__endpointUrl="not a url"),
    row("endpointUrl over ftp", CRD, spec__s3__endpointUrl="ftp://minio:21"),
    row("endpointUrl with credentials", CRD, spec__s3__endpointUrl="http://user:pw@minio:9000"),
    row("endpointUrl of no host", CRD, spec__s3__endpointUrl="http://"),
    row("trackingUri javascript", CRD, spec__mlflow__trackingUri="javascript:alert(1)"),
    row("trackingUri a local store", CRD, spec__mlflow__trackingUri="sqlite:///mlflow.db"),
    row("trackingUri with credentials", CRD, spec__mlflow__trackingUri="https://u:p@mlflow.example"),
    row("trackingUri of a long port", CRD, spec__mlflow__trackingUri="http://mlflow:999999"),
    row("registryUri a file", CRD, spec__mlflow__registryUri="file:///mlruns"),
    row("region empty", CRD, spec__s3__region=""),
    row("region with spaces", CRD, spec__s3__region="us east 1"),
    row("resume climbing out", CRD, spec__resume="s3://wmtp/ckpt/../../other"),
    row("resume step_", CRD, spec__resume="step_"),
    row("resume relative", CRD, spec__resume="ckpt/run/checkpoint_step_00000100"),
    row("resume over http", CRD, spec__resume="http://x/ckpt"),
    row("resumeFrom climbing out", CRD, spec__resumeFrom="/ckpt/../x"),
    row("eval dataset climbing out", CRD, spec__eval={"tasks": ["mbpp"], "datasets": {"mbpp": "s3://wmtp/../m"}}),
    row("a recipe checkpoint path", CRD, spec__recipe__checkpointing={"checkpoint_path": "/var/tmp/ckpt"}),
]
NAMES = [
    row("a name of 49", CRD, metadata__name="r" * 49),
    row("a name with a dot", CRD, metadata__name="tiny.rho1"),
    row("a name starting with a digit", CRD, metadata__name="1run"),
    row("an image with a space", CRD, spec__image=" ghcr.io/wmtp/trainer:0.1.0"),
    row("an image with an expansion", CRD, spec__image="ghcr.io/wmtp/trainer:$(TAG)"),
    row("a ServiceAccount in capitals", CRD, spec__serviceAccountName="Trainer"),
    row("an S3 Secret climbing out", CRD, spec__s3__credentialsSecret="../s3"),
    row("an MLflow Secret in capitals", CRD, spec__mlflow__credentialsSecret="Auth"),
    row("a StorageClass with a space", CRD, spec__modelVolume={"storageClassName": "fast ssd"}),
    row("a recipe ConfigMap in capitals", CRD, spec__recipe=None, spec__recipeRef={"name": "Recipes"}),
    row("a recipe key with a slash", CRD, spec__recipe=None, spec__recipeRef={"name": "r", "key": "a/b"}),
    row("a run name with a space", CRD, crd_only="the operator writes the WMTPRun's name there",
        spec__recipe__run={"name": "Bad Name"}),
    row("a source name climbing out", CRD, spec__recipe__data={"sources": [{"name": "../x"}]}),
    row("a dataset name climbing out", OPERATOR, spec__datasets={**DATASETS, "../up": "s3://wmtp/x.jsonl"}),
    row("a dataset name with a slash", OPERATOR, spec__datasets={**DATASETS, "a/b": "s3://wmtp/x.jsonl"}),
    row("a node label key with a space", OPERATOR, spec__nodeSelector={"gpu type": "a100"}),
    row("a node label value of 64", CRD, spec__nodeSelector={"gpu": "a" * 64}),
    row("a node label value with a space", CRD, spec__nodeSelector={"gpu": "a 100"}),
    row("a toleration key with a space", CRD, spec__tolerations=[{"key": "a b", "operator": "Exists"}]),
    row("an eval task unknown", CRD, spec__eval={"tasks": ["gsm8k"]}),
    row("an eval dataset of an unknown task", CRD, spec__eval={"datasets": {"gsm8k": "s3://wmtp/g.jsonl"}}),
]
QUANTITIES = [
    row("cpu in words", CRD, spec__resources={"limits": {"cpu": "lots"}}),
    row("cpu negative", CRD, spec__resources={"limits": {"cpu": "-1"}}),
    row("cpu a negative integer", OPERATOR, spec__resources={"limits": {"cpu": -1}}),
    row("memory with a space", CRD, spec__resources={"limits": {"memory": "1 Gi"}}),
    row("a resource name with a space", OPERATOR, spec__resources={"limits": {"my cpu": 1}}),
    row("a request above its limit", OPERATOR, spec__resources={"requests": {"cpu": 4}, "limits": {"cpu": "2"}}),
    row("a GPU request without a limit", OPERATOR, spec__resources={"requests": {"nvidia.com/gpu": 1}}),
    row("17 limits", CRD, crd_only=TIGHTER, spec__resources={"limits": {f"example.com/r{i}": 1 for i in range(17)}}),
    row("a volume of 0", OPERATOR, spec__modelVolume={"type": "persistentVolumeClaim", "size": "0"}),
    row("a volume negative", CRD, spec__modelVolume={"size": "-5Gi"}),
    row("an eval pod's memory in words", CRD, spec__eval={"resources": {"limits": {"memory": "much"}}}),
]
DURATIONS = [
    row("startupTimeout 0s", CRD, spec__startupTimeout="0s"),
    row("startupTimeout 29s", CRD, crd_only="the operator refuses only 0s: emulator tests wait seconds",
        spec__startupTimeout="29s"),
    row("startupTimeout in words", CRD, spec__startupTimeout="soon"),
    row("startupTimeout over 30 days", CRD, spec__startupTimeout="721h"),
    row("startupTimeout empty", CRD, spec__startupTimeout=""),
    row("eval timeout 30s", CRD, spec__eval={"timeout": "30s"}),
    row("eval timeout forever", CRD, spec__eval={"timeout": "forever"}),
]
CONFLICTS = [
    row("recipe and recipeRef", CRD, spec__recipeRef={"name": "recipes"}),
    row("neither recipe nor recipeRef", CRD, spec__recipe=None),
    row("rho1 without a reference model", CRD, spec__models__ref=None),
    row("critic without a reward model", CRD, spec__algorithm="critic-wmtp", spec__recipe__rho1=None),
    row("a claim without a size", CRD, spec__modelVolume={"type": "persistentVolumeClaim"}),
    row("another algorithm in the recipe", CRD, spec__recipe__train={"algo": "baseline-mtp"}),
    row("a source the spec does not define", CRD, spec__recipe__data={"sources": [{"name": "mbpp"}]}),
    row("sources and no datasets", CRD, spec__datasets=None),
    row("k above samples", CRD, spec__eval={"k": [1, 10], "samples": 5}),
    row("mbpp without its data", CRD, spec__eval={"tasks": ["mbpp"]}),
    row("Exists with a value", CRD, spec__tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
    row("tolerationSeconds without NoExecute", CRD, spec__tolerations=[{"key": "k", "tolerationSeconds": 60}]),
    row("a resumeFrom nobody wrote", OPERATOR, ignored=True,
        spec__resumeFrom=f"s3://wmtp/checkpoints/another-run/{step_dir_name(100)}"),
]  # fmt: skip
RECIPE_REFS = [
    row("a recipeRef of a bomb", OPERATOR, "a: &a [x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 8)}]\n" for i in range(6)), **REF),
    row("a recipeRef nested deep", OPERATOR, "train: " + "[" * 5000 + "]" * 5000 + "\n", **REF),
    row("a recipeRef too large", OPERATOR, "run: {tags: {a: '" + "x" * 40_000 + "'}}\n", **REF),
    row("a recipeRef of a huge integer", OPERATOR, "train: {max_steps: " + "9" * 5000 + "}\n", **REF),
    row("a recipeRef not YAML", OPERATOR, "train: [\n", **REF),
    row("a recipeRef with an unknown key", OPERATOR, GOOD_RECIPE + "trian: {}\n", **REF),
    row("a recipeRef of another algorithm", OPERATOR, GOOD_RECIPE.replace("{max_steps: 60}", "{algo: critic-wmtp}"),
        **REF),
    row("a recipeRef naming an undefined dataset", OPERATOR, "train: {}\ndata: {sources: [{name: mbpp}]}\n", **REF),
    row("a recipeRef with a checkpoint path", OPERATOR, GOOD_RECIPE + "checkpointing: {checkpoint_path: /x}\n",
        **REF),
    row("a recipeRef of a list", OPERATOR, "[1, 2]\n", **REF),
    row("a recipeRef that is missing", OPERATOR, None, **REF),
]  # fmt: skip
ROWS = TYPES + BOUNDS + URIS + NAMES + QUANTITIES + DURATIONS + CONFLICTS + RECIPE_REFS


def operator_verdict(body: dict[str, Any], recipe_text: str | None) -> tuple[bool, list[dict[str, Any]]]:
    """Whether one reconcile pass finds the spec invalid (Valid=False), and the Jobs it creates."""
    plan = reconcile(body, Observed(recipe_text=recipe_text), NOW)
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    jobs = [a.obj for a in plan.actions if isinstance(a, Create) and a.obj["kind"] == "Job"]
    return valid["status"] == "False", jobs


def test_the_table_has_a_hundred_specs_of_every_kind() -> None:
    assert len(ROWS) >= 100 and len({r.name for r in ROWS}) == len(ROWS)
    assert all(len(group) >= 7 for group in (TYPES, BOUNDS, URIS, NAMES, QUANTITIES, DURATIONS, CONFLICTS))


@pytest.mark.parametrize("case", ROWS, ids=[r.name for r in ROWS])
def test_an_invalid_spec_is_refused_before_a_pod_runs(
    case: Row, make_run: Callable[..., dict[str, Any]], admit: Callable[..., list[str]]
) -> None:
    body = make_run(**case.overrides)
    by_crd = bool(admit(body))
    invalid, jobs = operator_verdict(body, case.recipe_text)
    assert by_crd or invalid, "passes both the CRD and the operator"
    assert (CRD if by_crd else OPERATOR) == case.layer, "refused first by another layer than the table says"
    if case.layer == OPERATOR:
        assert invalid and (jobs == [] or case.ignored)
    if case.ignored:
        assert jobs and all(case.overrides["spec.resumeFrom"] not in str(job) for job in jobs)


BOTH = [r for r in ROWS if r.layer == CRD and not r.crd_only and "metadata.name" not in r.overrides]


@pytest.mark.parametrize("case", BOTH, ids=[r.name for r in BOTH])
def test_what_the_crd_refuses_the_operator_refuses_too(case: Row, make_run: Callable[..., dict[str, Any]]) -> None:
    """The rules are written once (the trainer's models and `wmtp.config.uris`, whose patterns the CRD has): a spec
    that never met this CRD (an older version, an emulator) is refused all the same."""
    invalid, jobs = operator_verdict(make_run(**case.overrides), case.recipe_text)
    assert invalid and jobs == []
