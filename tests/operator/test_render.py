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
from pydantic import ValidationError

from support.kubelet import argv, expand, restricted_violations
from wmtp import contract
from wmtp.config import ConfigError, EvalSettings, load_config, parse_config, parse_recipe, read_document
from wmtp_operator import render
from wmtp_operator.spec import Defaults, Run

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).resolve().parents[2]
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
        {"uri": "s3://wmtp/models/tiny/base", "dest": "/models/base", "weights": "rank0"},
        {"uri": "s3://wmtp/models/tiny/ref", "dest": "/models/ref", "weights": "rank0"},
        {"uri": "s3://wmtp/datasets/HumanEval.jsonl.gz", "dest": "/models/data/humaneval"},
    ]


def test_on_emptydir_volumes_only_node_rank_0_pulls_the_weights_and_the_others_wait_for_it(
    make_run: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    from wmtp.pull import load_spec

    objects = _rendered(make_run(**{"spec.nodes": 4, "spec.startupTimeout": "45m"}), None, 1)
    spec = tmp_path / contract.PULL_FILE
    spec.write_text(objects[0]["data"][contract.PULL_FILE])
    rank0, everything = contract.PULL_WEIGHTS_RANK0, contract.PULL_WEIGHTS_ALL
    # The trainer's own reading of the rendered spec: the models' weights on node rank 0 alone, data on every rank.
    assert [(job.dest, job.weights) for job in load_spec(spec)] == [
        ("/models/base", rank0),
        ("/models/ref", rank0),
        ("/models/data/humaneval", everything),
    ]
    pod = objects[-1]["spec"]["template"]["spec"]
    puller, trainer = pod["initContainers"][0], pod["containers"][0]
    rank = next(e for e in puller["env"] if e["name"] == contract.ENV_NODE_RANK)
    assert rank == next(e for e in trainer["env"] if e["name"] == contract.ENV_NODE_RANK)
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{render.INDEX_ANNOTATION}']"
    # The nodes that pulled only small files wait at the rendezvous while node 0 pulls the weights.
    assert "--rdzv-conf=timeout=2700" in trainer["args"]


@pytest.mark.parametrize("case", ["shared PVC", "one node"])
def test_a_shared_volume_or_a_single_pod_pulls_everything(case: str, make_run: Callable[..., dict[str, Any]]) -> None:
    if case == "shared PVC":  # the first puller fills it for every pod and attempt; the others find it complete
        objects = _rendered(gpu_run(make_run), GPU_RECIPE, 3)
    else:
        objects = _rendered(make_run(**{"spec.nodes": 1}), None, 1)
    pulled = yaml.safe_load(objects[0]["data"][contract.PULL_FILE])
    assert len(pulled) >= 3 and all(contract.PULL_WEIGHTS not in item for item in pulled)
    args = objects[-1]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [arg for arg in args if arg.startswith("--rdzv-conf")]


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
    assert trainer["command"] == list(contract.LAUNCH_COMMAND)
    args = trainer["args"]
    # the launcher's grace is a little below the pod's, so that it can still write its last words
    assert args[:3] == ["--grace-seconds", "270", "--"] and pod["terminationGracePeriodSeconds"] == 300
    assert args[3:8] == [
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
    ("overrides", "tail"),
    [
        ({}, ["--resume", "auto"]),
        ({"spec.resume": "never"}, ["--resume", "never"]),
        ({"spec.resume": "s3://bkt/c/tiny-rho1/checkpoint_step_00000500"},
         ["--resume", "s3://bkt/c/tiny-rho1/checkpoint_step_00000500"]),
        # the operator's choice may fall back to the newest intact checkpoint; the user's never does
        ({"spec.resume": "step_500", "spec.resumeFrom": "s3://bkt/c/tiny-rho1/checkpoint_step_00001000"},
         ["--resume", "s3://bkt/c/tiny-rho1/checkpoint_step_00001000", contract.RESUME_FALLBACK_FLAG]),
    ],
)  # fmt: skip
def test_trainer_resumes_from_resume_from_with_fallback_else_from_resume(
    overrides: dict[str, Any], tail: list[str], make_run: Callable[..., dict[str, Any]]
) -> None:
    args = _job(make_run(**overrides))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-len(tail) :] == tail and args[-len(tail) - 1] != "--resume"


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
         "WMTP_DEFAULT_MLFLOW_SECRET": "wmtp-mlflow", "WMTP_OPERATOR_STANDALONE": "true"}
    )  # fmt: skip
    unset = Run.from_body(make_run(**{"spec.s3.credentialsSecret": None}), defaults)
    assert unset.spec.s3.credentials_secret == "team-s3"
    assert unset.spec.mlflow.tracking_uri == "http://mlflow:5000"
    assert unset.spec.mlflow.credentials_secret == "wmtp-mlflow"
    env = {
        e["name"]: e.get("value") or e["valueFrom"].get("secretKeyRef", {}).get("name")
        for e in render.job(unset, 1, pull=True)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["MLFLOW_TRACKING_PASSWORD"] == "wmtp-mlflow"
    own = Run.from_body(make_run(**{"spec.mlflow": {"trackingUri": "http://own:5000"}}), defaults)
    assert own.spec.s3.credentials_secret == "wmtp-s3"
    assert own.spec.mlflow.tracking_uri == "http://own:5000"
    # The default Secret holds the default server's credentials: a run's own server never receives them.
    assert own.spec.mlflow.credentials_secret is None
    named = Run.from_body(make_run(**{"spec.mlflow": {"credentialsSecret": "team-mlflow"}}), defaults)
    assert named.spec.mlflow.credentials_secret == "team-mlflow"
    assert Defaults.from_env({}) == Defaults()


@pytest.mark.parametrize("namespace", ["team-a", "team-b"])
def test_a_runs_mlflow_experiment_and_registered_model_are_its_namespaces(
    make_run: Callable[..., dict[str, Any]], namespace: str
) -> None:
    body = make_run(**{"metadata.namespace": namespace, "spec.mlflow": {"experiment": "wmtp-7b"}})
    run = Run.from_body(body)
    config = parse_config(yaml.safe_load(_rendered(body, None, 1)[0]["data"]["config.yaml"]))
    assert config.mlflow.experiment == f"{namespace}/wmtp-7b"
    assert config.mlflow.registered_model == f"wmtp-{namespace}-{run.spec.algorithm}"


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
    claim, job = next(o for o in objects if o["kind"] == "PersistentVolumeClaim"), objects[-1]
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


@pytest.mark.parametrize("case", ["tiny-cpu", "gpu-4node"])
def test_pods_meet_pod_security_restricted_with_a_writable_model_volume(
    case: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    objects = _rendered(make_run(), None, 1) if case == "tiny-cpu" else _rendered(gpu_run(make_run), GPU_RECIPE, 3)
    pod = objects[-1]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] != 0
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_the_api_token_is_mounted_in_the_trainer_container_alone(make_run: Callable[..., dict[str, Any]]) -> None:
    pod = _job(make_run())["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "tiny-rho1-trainer"
    mounts = {
        c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for c in [*pod["initContainers"], *pod["containers"]]
    }
    assert mounts["trainer"][contract.SERVICE_ACCOUNT_DIR] == "kube-api-access"
    assert (
        contract.SERVICE_ACCOUNT_DIR not in mounts["pull"].values() and "kube-api-access" not in mounts["pull"].values()
    )
    token = next(v for v in pod["volumes"] if v["name"] == "kube-api-access")["projected"]["sources"]
    assert {"serviceAccountToken", "configMap", "downwardAPI"} == {key for source in token for key in source}


@pytest.mark.parametrize(
    ("account", "subject", "objects"),
    [
        (None, "tiny-rho1-trainer", ["ServiceAccount", "Role", "RoleBinding"]),
        ("irsa-s3", "irsa-s3", ["Role", "RoleBinding"]),
    ],
)
def test_each_run_gets_an_identity_that_may_only_patch_its_own_status(
    account: str | None, subject: str, objects: list[str], make_run: Callable[..., dict[str, Any]]
) -> None:
    run = Run.from_body(make_run(**{"spec.serviceAccountName": account}))
    identity = render.identity(run)
    assert [o["kind"] for o in identity] == objects
    role, binding = identity[-2], identity[-1]
    assert role["rules"] == [
        {"apiGroups": ["wmtp.io"], "resources": ["wmtpruns/status"], "resourceNames": ["tiny-rho1"], "verbs": ["patch"]}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": subject, "namespace": "team-a"}]
    assert render.job(run, 1, pull=True)["spec"]["template"]["spec"]["serviceAccountName"] == subject


SECRET = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "NODE_RANK": "1"}


@pytest.mark.parametrize(
    ("overrides", "literal"),
    [
        ({"spec.resume": "/$(AWS_SECRET_ACCESS_KEY)"}, "/$(AWS_SECRET_ACCESS_KEY)"),
        ({"spec.resume": "s3://bkt/$$(AWS_SECRET_ACCESS_KEY)"}, "s3://bkt/$$(AWS_SECRET_ACCESS_KEY)"),
        ({"spec.resumeFrom": "s3://bkt/$(AWS_SECRET_ACCESS_KEY)$"}, "s3://bkt/$(AWS_SECRET_ACCESS_KEY)$"),
    ],
)
def test_no_spec_value_is_expanded_by_kubernetes_in_argv(
    overrides: dict[str, Any], literal: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    trainer = _job(make_run(**overrides))["spec"]["template"]["spec"]["containers"][0]
    command = argv(trainer, SECRET)
    assert literal in command and not any("s3cr3t" in part for part in command)
    assert "--node-rank=1" in command  # the operator's own reference still expands


def test_no_spec_value_is_expanded_by_kubernetes_in_env(make_run: Callable[..., dict[str, Any]]) -> None:
    body = make_run(
        **{"spec.s3.endpointUrl": "http://minio/$(AWS_SECRET_ACCESS_KEY)", "spec.mlflow.trackingUri": "http://m/$(X)"}
    )
    env = _job(body)["spec"]["template"]["spec"]["containers"][0]["env"]
    values = {e["name"]: expand(e["value"], SECRET) for e in env if "value" in e}
    assert (
        values["AWS_ENDPOINT_URL"] == "http://minio/$(AWS_SECRET_ACCESS_KEY)"
        and values["MLFLOW_TRACKING_URI"] == "http://m/$(X)"
    )


def test_recipe_values_reach_the_trainer_as_data_never_expanded(
    make_run: Callable[..., dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = make_run(
        **{"spec.recipe.run": {"tags": {"leak": "${AWS_SECRET_ACCESS_KEY}", "cmd": "$(AWS_SECRET_ACCESS_KEY)"}}}
    )
    config_map = _rendered(body, None, 1)[0]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    path = tmp_path / "recipe.yaml"
    path.write_text(config_map["data"]["recipe.yaml"])
    assert path.read_text().startswith(contract.RENDERED_MARKER)
    tags = read_document(path)["run"]["tags"]
    assert tags == {"leak": "${AWS_SECRET_ACCESS_KEY}", "cmd": "$(AWS_SECRET_ACCESS_KEY)"}


def test_mlflow_credentials_come_from_a_secret_reference(make_run: Callable[..., dict[str, Any]]) -> None:
    body = make_run(**{"spec.mlflow": {"trackingUri": "https://mlflow.example", "credentialsSecret": "mlflow-auth"}})
    env = {e["name"]: e for e in _job(body)["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key, "optional": True}
    config = parse_config(yaml.safe_load(_rendered(body, None, 1)[0]["data"]["config.yaml"]))
    assert config.mlflow.tracking_uri == "https://mlflow.example"


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ({}, {"mixed_precision": "no", "timeout_s": 600, "activation_checkpointing": False, "cpu_offload": False}),
        ({"mixedPrecision": "bf16", "distributed": {"timeoutS": 900, "backend": "nccl"},
          "fsdp": {"activationCheckpointing": True, "cpuOffload": True}},
         {"mixed_precision": "bf16", "timeout_s": 900, "activation_checkpointing": True, "cpu_offload": True}),
    ],
)  # fmt: skip
def test_device_settings_reach_the_trainer_config(
    devices: dict[str, Any], expected: dict[str, Any], make_run: Callable[..., dict[str, Any]]
) -> None:
    config = parse_config(
        yaml.safe_load(_rendered(make_run(**{"spec.devices": devices}), None, 1)[0]["data"]["config.yaml"])
    )
    got = config.devices
    assert {
        "mixed_precision": got.mixed_precision,
        "timeout_s": got.distributed.timeout_s,
        "activation_checkpointing": got.fsdp.activation_checkpointing,
        "cpu_offload": got.fsdp.cpu_offload,
    } == expected
    assert got.distributed.enabled and got.fsdp.enabled  # 2 pods: the operator's decision, not the spec's


def test_the_7b_example_uses_the_scale_knobs_of_the_7b_config() -> None:
    example = next(d for d in yaml.safe_load_all((ROOT / "configs" / "wmtprun-7b.yaml").read_text()) if d)
    example["metadata"].update(namespace="team-a", uid="u")
    rendered = render.trainer_files(Run.from_body(example)).config.devices
    wanted = load_config(ROOT / "configs" / "config.7b.yaml").devices
    assert rendered.mixed_precision == wanted.mixed_precision
    assert rendered.fsdp == wanted.fsdp
    assert (rendered.distributed.timeout_s, rendered.distributed.backend) == (
        wanted.distributed.timeout_s,
        wanted.distributed.backend,
    )


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 64])
def test_dataset_names_that_would_leave_the_model_volume_are_refused(
    name: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    with pytest.raises(ValidationError, match="datasets"):
        Run.from_body(make_run(**{"spec.datasets": {name: "s3://wmtp/x.jsonl"}}))


def test_the_eval_job_runs_wmtp_eval_on_the_final_model_like_a_trainer_pod_without_the_training(
    make_run: Callable[..., dict[str, Any]],
) -> None:
    evaluation = {"tasks": ["humaneval", "mbpp"], "k": [1, 10], "samples": 20, "limit": 50, "timeout": "1h30m",
                  "datasets": {"mbpp": "s3://data/$(AWS_SECRET_ACCESS_KEY)/mbpp.jsonl"},
                  "resources": {"limits": {"nvidia.com/gpu": 1}}}  # fmt: skip
    run = Run.from_body(gpu_run(make_run) | {"spec": {**gpu_run(make_run)["spec"], "eval": evaluation}})
    job = render.eval_job(run)
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    assert job["metadata"]["name"] == "critic-7b-eval" and render.is_evaluation(job)
    assert job["metadata"]["ownerReferences"] == [render.owner_reference(run)]
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (0, 5400, 86400)
    pod = spec["template"]["spec"]
    assert render.is_evaluation(spec["template"]) and restricted_violations(pod) == []
    assert pod["serviceAccountName"] == "critic-7b-trainer" and pod["automountServiceAccountToken"] is False
    (evaluator,) = pod["containers"]
    assert evaluator["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert evaluator["terminationMessagePath"] == contract.TERMINATION_LOG
    assert all(m["name"] != render.pod.TOKEN_VOLUME for m in evaluator["volumeMounts"])
    command = argv(evaluator, {"AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    assert command == [
        "wmtp", "eval", "--model", f"s3://ckpt/wmtp/critic-7b/{contract.FINAL_DIR}", "--experiment", "team-a/wmtp-7b",
        "--tasks", "humaneval,mbpp", "--k", "1,10", "--samples", "20", "--limit", "50", "--temperature", "0.8",
        "--max-new-tokens", "256", "--dataset", "mbpp=s3://data/$(AWS_SECRET_ACCESS_KEY)/mbpp.jsonl",
        "--program-timeout", "10.0", "--speed-prompts", "8", "--seed", "0", "--batch-size", "8",
        "--chat-template", "False", "--extract-code", "False",
    ]  # fmt: skip
    # Every option is one `wmtp eval` takes: the flags are the settings' names.
    flags = {f"--{name.replace('_', '-')}" for name in EvalSettings.model_fields} - {"--datasets"} | {"--dataset"}
    assert {arg for arg in command if arg.startswith("--")} - {"--model", "--experiment"} == flags
    env = {e["name"]: e for e in evaluator["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops:5000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-prod"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"tasks": ["mbpp"]}, "spec.eval: datasets.mbpp is required: there is no bundled copy of mbpp"),
        ({"k": [10]}, "spec.eval: k 10 is more than samples 1"),
        ({"datasets": {"gsm8k": "s3://d/x.jsonl"}}, "spec.eval.datasets.gsm8k.[key]: Input should be"),
        ({"tasks": []}, "spec.eval.tasks: List should have at least 1 item"),
    ],
)
def test_an_invalid_spec_eval_is_one_line_naming_the_field(
    evaluation: dict[str, Any], message: str, make_run: Callable[..., dict[str, Any]]
) -> None:
    from wmtp_operator.plan import Observed
    from wmtp_operator.reconcile import reconcile

    plan = reconcile(make_run(**{"spec.eval": evaluation}), Observed(), "2026-01-02T03:04:05Z")
    valid = next(c for c in plan.status["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and message in valid["message"] and "\n" not in valid["message"]
    assert plan.actions == []


def _parsed(argv: list[str]) -> dict[str, Any]:
    """`argv` (after `wmtp`) parsed by the trainer's own CLI, as the container would run it: its parameters."""
    import typer

    from wmtp.cli import app

    group = typer.main.get_command(app)
    command = group.get_command(group.context_class(group), argv[0])
    assert command is not None, argv
    return command.make_context(argv[0], list(argv[1:])).params


@pytest.mark.parametrize("resume_from", [None, "s3://bucket/ckpt/tiny/checkpoint_step_00000010"])
def test_every_rendered_command_line_parses_with_the_trainers_own_cli(make_run, resume_from: str | None) -> None:
    """The operator builds argv from `wmtp.contract`; the trainer's CLI must take every flag of it."""
    evaluation = {"limit": 2, "k": [1, 2], "samples": 2}
    run = Run.from_body(make_run(**{"spec.resumeFrom": resume_from, "spec.eval": evaluation}))
    pod = render.job(run, 2, pull=True)["spec"]["template"]["spec"]
    puller, trainer = pod["initContainers"][0], pod["containers"][0]
    assert _parsed(puller["command"][1:])["spec"] is not None

    assert trainer["command"] == list(contract.LAUNCH_COMMAND)
    launch = _parsed([contract.LAUNCH_COMMAND[1], *trainer["args"]])
    module = launch["torchrun_args"].index("-m")
    assert launch["torchrun_args"][module + 1] == "wmtp"
    train = _parsed(launch["torchrun_args"][module + 2 :])
    assert (train["resume"], train["resume_fallback"]) == ((resume_from, True) if resume_from else ("auto", False))
    assert str(train["config"]).endswith(contract.CONFIG_FILE) and str(train["recipe"]).endswith(contract.RECIPE_FILE)

    evaluator = render.eval_job(run)["spec"]["template"]["spec"]["containers"][0]
    evaluated = _parsed([*evaluator["command"][1:], *evaluator["args"]])
    assert (evaluated["model"], evaluated["limit"], evaluated["k"]) == (render.final_model(run), 2, "1,2")
