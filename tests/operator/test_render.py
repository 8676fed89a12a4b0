"""Rendering a WMTPRun into the trainer's files and one attempt's objects (golden files, validity, tables)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from wmtp.config import ConfigError, parse_config, parse_recipe
from wmtp_operator import render
from wmtp_operator.spec import Defaults, Run

GOLDEN = Path(__file__).parent / "golden"
GPU_RECIPE = """\
train: {algo: critic-wmtp, max_steps: 20000, grad_accum: 4}
data:
  sources: [{name: mbpp}, {name: codecontests}]
  max_length: 2048
  batch_size: 64
critic: {pretrain_steps: 200}
"""


class _GoldenDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _block_strings(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_GoldenDumper.add_representer(str, _block_strings)


def gpu_run(make_run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """4 nodes × 8 GPUs, critic-wmtp from a recipe ConfigMap, a shared model PVC, third attempt after restarts."""
    return make_run(
        **{
            "metadata.name": "critic-7b",
            "spec.algorithm": "critic-wmtp",
            "spec.recipe": None,
            "spec.recipeRef": {"name": "critic-recipes", "key": "7b.yaml"},
            "spec.models": {
                "base": "s3://models/7B_1T_4",
                "ref": None,
                "rm": "s3://models/Starling-RM-7B-alpha",
            },
            "spec.datasets": {"mbpp": "s3://data/mbpp/train.jsonl", "codecontests": "s3://data/cc/train.jsonl.gz"},
            "spec.checkpoints": {"basePath": "s3://ckpt/wmtp", "saveInterval": 500, "keepLast": 3},
            "spec.resumeFrom": "s3://ckpt/wmtp/critic-7b/checkpoint_step_00001000",
            "spec.s3": {"region": "eu-west-1", "credentialsSecret": "s3-prod"},
            "spec.mlflow": {"trackingUri": "http://mlflow.mlops:5000", "experiment": "wmtp-7b"},
            "spec.nodes": 4,
            "spec.nprocPerNode": 8,
            "spec.resources": {
                "requests": {"cpu": "64", "memory": "900Gi", "nvidia.com/gpu": 8},
                "limits": {"memory": "1000Gi", "nvidia.com/gpu": 8},
            },
            "spec.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "spec.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "spec.modelVolume": {"type": "persistentVolumeClaim", "size": "200Gi", "storageClassName": "fast-rwx"},
            "spec.ttlSecondsAfterFinished": 86400,
        }
    )


def _rendered(body: dict[str, Any], recipe_text: str | None, attempt: int) -> list[dict[str, Any]]:
    run = Run.from_body(body)
    return render.attempt_objects(run, render.trainer_files(run, recipe_text), attempt)


@pytest.mark.parametrize("case", ["tiny-cpu", "gpu-4node"])
def test_rendered_objects_match_golden_files(case: str, make_run: Callable[..., dict[str, Any]]) -> None:
    # Regenerate after an intended change with WMTP_REGENERATE=1 and review the diff.
    objects = _rendered(make_run(), None, 1) if case == "tiny-cpu" else _rendered(gpu_run(make_run), GPU_RECIPE, 3)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("WMTP_REGENERATE"):
        path.write_text(yaml.dump_all(objects, Dumper=_GoldenDumper, sort_keys=False, width=120))
    assert objects == list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("case", ["tiny-cpu", "gpu-4node"])
def test_rendered_objects_pass_kubernetes_validate_strict(case: str, make_run: Callable[..., dict[str, Any]]) -> None:
    objects = _rendered(make_run(), None, 1) if case == "tiny-cpu" else _rendered(gpu_run(make_run), GPU_RECIPE, 3)
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Service", "Job"}
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_trainer_files_round_trip_through_the_trainers_own_models(make_run: Callable[..., dict[str, Any]]) -> None:
    config_map = _rendered(make_run(), None, 1)[0]
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    recipe = parse_recipe(yaml.safe_load(config_map["data"]["recipe.yaml"]))
    assert recipe.run.name == "tiny-rho1"  # the WMTPRun's name, so two runs never share checkpoints
    assert config.paths.models.base == "/models/base"
    assert config.paths.datasets["humaneval"] == "/models/data/humaneval/HumanEval.jsonl.gz"
    assert config.paths.checkpoints.base_path == "s3://wmtp/checkpoints"
    assert config.devices.distributed.enabled and config.devices.fsdp.enabled
    assert yaml.safe_load(config_map["data"]["pull.yaml"]) == [
        {"uri": "s3://wmtp/models/tiny/base", "dest": "/models/base"},
        {"uri": "s3://wmtp/models/tiny/ref", "dest": "/models/ref"},
        {"uri": "s3://wmtp/datasets/HumanEval.jsonl.gz", "dest": "/models/data/humaneval"},
    ]


def _job(body: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    return _rendered(body, None, attempt)[-1]


def test_attempt_job_runs_torchrun_across_all_pods_with_rank_from_the_completion_index(
    make_run: Callable[..., dict[str, Any]],
) -> None:
    job = _job(make_run(**{"spec.nodes": 3, "spec.nprocPerNode": 2}), attempt=5)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["metadata"]["name"] == "tiny-rho1-a5"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        3,
        3,
        0,
    )
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == "tiny-rho1"
    trainer = pod["containers"][0]
    args = trainer["args"]
    assert args[:5] == [
        "--nnodes=3",
        "--nproc-per-node=2",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=tiny-rho1-a5-0.tiny-rho1",
        "--master-port=29500",
    ]
    rank = next(e for e in trainer["env"] if e["name"] == "NODE_RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{render.INDEX_ANNOTATION}']"
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert pod["initContainers"][0]["command"] == ["wmtp", "pull", "--spec", "/etc/wmtp/pull.yaml"]


@pytest.mark.parametrize(
    ("overrides", "resume"),
    [
        ({}, "auto"),
        ({"spec.resume": "never"}, "never"),
        ({"spec.resume": "step_500", "spec.resumeFrom": "s3://b/c/tiny-rho1/checkpoint_step_00001000"},
         "s3://b/c/tiny-rho1/checkpoint_step_00001000"),
    ],
)  # fmt: skip
def test_trainer_resumes_from_resume_from_else_resume(
    overrides: dict[str, Any], resume: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    args = _job(make_run(**overrides))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--resume", resume]


def test_s3_credentials_come_from_the_named_secret_and_never_appear_in_the_spec(
    make_run: Callable[..., dict[str, Any]],
) -> None:
    env = {e["name"]: e for e in _job(make_run())["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "wmtp-s3",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": False,
    }
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.wmtp-system.svc:9000"
    assert (env["WMTP_RUN_NAME"]["value"], env["WMTP_RUN_NAMESPACE"]["value"]) == ("tiny-rho1", "team-a")


def test_operator_defaults_fill_only_what_the_run_leaves_unset(make_run: Callable[..., dict[str, Any]]) -> None:
    defaults = Defaults.from_env(
        {"WMTP_DEFAULT_S3_SECRET": "team-s3", "WMTP_DEFAULT_MLFLOW_URI": "http://mlflow:5000",
         "WMTP_TRAINER_SERVICE_ACCOUNT": "trainer", "WMTP_OPERATOR_STANDALONE": "true"}
    )  # fmt: skip
    unset = Run.from_body(make_run(**{"spec.s3.credentialsSecret": None, "spec.serviceAccountName": None}), defaults)
    assert (unset.spec.s3.credentials_secret, unset.spec.service_account_name) == ("team-s3", "trainer")
    assert unset.spec.mlflow.tracking_uri == "http://mlflow:5000"
    own = Run.from_body(make_run(**{"spec.mlflow": {"trackingUri": "http://own:5000"}}), defaults)
    assert (own.spec.s3.credentials_secret, own.spec.service_account_name) == ("wmtp-s3", "wmtp-trainer")
    assert own.spec.mlflow.tracking_uri == "http://own:5000"
    assert Defaults.from_env({}) == Defaults()


def test_local_models_are_not_pulled_and_a_single_pod_run_is_not_distributed(
    make_run: Callable[..., dict[str, Any]],
) -> None:
    body = make_run(
        **{
            "spec.models": {"base": "/data/base", "ref": "file:///data/ref"},
            "spec.datasets": {"humaneval": "/data/HumanEval.jsonl.gz"},
            "spec.nodes": 1,
        }
    )
    objects = _rendered(body, None, 1)
    config = parse_config(yaml.safe_load(objects[0]["data"]["config.yaml"]))
    assert "pull.yaml" not in objects[0]["data"]
    assert "initContainers" not in objects[-1]["spec"]["template"]["spec"]
    assert config.paths.models.base == "/data/base" and not config.devices.distributed.enabled


def test_gpu_runs_train_in_bf16_on_a_shared_model_claim(make_run: Callable[..., dict[str, Any]]) -> None:
    objects = _rendered(gpu_run(make_run), GPU_RECIPE, 1)
    claim, job = objects[2], objects[-1]
    config = parse_config(yaml.safe_load(objects[0]["data"]["config.yaml"]))
    assert config.devices.mixed_precision == "bf16"
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "critic-7b-models"}


FROM_REF = {"spec.recipe": None, "spec.recipeRef": {"name": "r"}}


@pytest.mark.parametrize(
    ("overrides", "recipe_text", "message"),
    [
        ({"spec.recipe.optim": {"lr": -1}}, None, "optim.lr: Input should be greater than 0"),
        ({"spec.recipe.optim": {"lrr": 1}}, None, "optim.lrr: unknown key"),
        ({"spec.recipe.train": {"algo": "baseline-mtp"}}, None, "train.algo is baseline-mtp but spec.algorithm is"),
        ({"spec.recipe.data": {"sources": [{"name": "mbpp"}]}}, None, "spec.datasets.mbpp: named by the recipe's"),
        ({"spec.recipe.checkpointing": {"checkpoint_path": "/tmp/x"}}, None,
         "checkpointing.checkpoint_path conflicts with spec.checkpoints.basePath"),
        (FROM_REF, None, "recipeRef ConfigMap r key recipe.yaml: not found"),
        (FROM_REF, "[1, 2]", "expected a mapping at the top level"),
        (FROM_REF, "a: [", "not valid YAML"),
    ],
)  # fmt: skip
def test_invalid_recipes_are_refused_before_anything_is_rendered(
    overrides: dict[str, Any], recipe_text: str | None, message: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        render.trainer_files(Run.from_body(make_run(**overrides)), recipe_text)
