"""What the trainer and the operator agree on, torch-free: each fact is written here once and both sides import it.

- Algorithms: the frozen models each one needs, by role, and whether it has a pretraining stage. The CRD's enum
  and CEL rules, the trainer's config checks and `wmtp validate` all derive from this table.
- The trainer pod: the environment variables it reads, the paths the operator mounts, the status fields rank 0
  reports, and the exit codes with their meanings.
- Evaluation: the code tasks `wmtp eval` scores, which the WMTPRun's spec.eval offers.
- The checkpoint layout's names, so that the operator can tell a checkpoint of its run from anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

# ----------------------------------------------------------------------------- algorithms


@dataclass(frozen=True)
class ModelRole:
    """A frozen model an algorithm may need; its key is the field under paths.models and spec.models."""

    name: str
    what: str

    def __str__(self) -> str:
        return f"the {self.name}: {self.what}"


MODEL_ROLES: dict[str, ModelRole] = {
    "ref": ModelRole("reference model", "a causal LM with the base model's tokenizer"),
    "rm": ModelRole("reward model", "a sequence classifier with one label"),
}


@dataclass(frozen=True)
class AlgorithmInfo:
    """What a run of this algorithm needs besides the base model."""

    name: str
    summary: str
    frozen: tuple[str, ...] = ()  # MODEL_ROLES keys whose models must be given
    pretrain: bool = False  # a stage before multi-token training (not repeated on resume)

    def __post_init__(self) -> None:
        unknown = [role for role in self.frozen if role not in MODEL_ROLES]
        if unknown:
            raise ValueError(f"algorithm {self.name}: unknown model role(s) {unknown}; known: {list(MODEL_ROLES)}")


_ALGORITHMS: dict[str, AlgorithmInfo] = {}


def register_algorithm(info: AlgorithmInfo) -> AlgorithmInfo:
    """Make `info.name` a valid `train.algo`; registering the same info twice is harmless."""
    known = _ALGORITHMS.setdefault(info.name, info)
    if known != info:
        raise ValueError(f"algorithm {info.name} is already registered as {known}")
    return info


def algorithm(name: str) -> AlgorithmInfo:
    """The registered algorithm called `name`; ValueError listing the known ones otherwise."""
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(algorithm_names())}") from None


def algorithm_names() -> tuple[str, ...]:
    return tuple(_ALGORITHMS)


BASELINE_MTP = register_algorithm(AlgorithmInfo("baseline-mtp", "every target weighs 1 (plain multi-token prediction)"))
RHO1_WMTP = register_algorithm(
    AlgorithmInfo("rho1-wmtp", "excess loss against a reference model selects or weights targets", frozen=("ref",))
)
CRITIC_WMTP = register_algorithm(
    AlgorithmInfo(
        "critic-wmtp", "TD deltas of a value head trained on reward-model rewards", frozen=("rm",), pretrain=True
    )
)
# The algorithms every installation has: the WMTPRun CRD's enum. Plugins registered later train locally.
BUILTIN_ALGORITHMS: tuple[str, ...] = algorithm_names()

# ----------------------------------------------------------------------------- the trainer pod

GROUP = "wmtp.io"
VERSION = "v1alpha1"
KIND = "WMTPRun"
PLURAL = "wmtpruns"

# Environment variables a trainer pod reads.
ENV_RUN_NAME = "WMTP_RUN_NAME"  # the WMTPRun whose status rank 0 reports to
ENV_RUN_NAMESPACE = "WMTP_RUN_NAMESPACE"
ENV_ATTEMPT = "WMTP_ATTEMPT"  # the attempt this pod belongs to: its reports carry it, so stale ones are ignored
ENV_NODE_RANK = "NODE_RANK"  # the pod's completion index: torchrun's node rank
ENV_TERMINATION_LOG = "WMTP_TERMINATION_LOG"  # where to write the termination message (default TERMINATION_LOG)
# Where a pod finds its API credentials (token, ca.crt, namespace): rank 0 reports with them. The operator mounts
# them (a projected token) into the trainer container alone.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# A ServiceAccount a WMTPRun may name for its pods (spec.serviceAccountName) opts in with this label, valued "true",
# set by whoever controls it: naming one hands its identity (a cloud role, say) to every trainer pod of the run.
TRAINER_ACCOUNT_LABEL = f"{GROUP}/trainer"

# Where the operator mounts things in a trainer pod.
CONFIG_DIR = "/etc/wmtp"  # config.yaml, recipe.yaml and pull.yaml, rendered by the operator
MODEL_DIR = "/models"  # the model volume `wmtp pull` fills
WORK_DIR = "/workspace"  # scratch: run directory, temporary files
CONFIG_FILE, RECIPE_FILE, PULL_FILE = "config.yaml", "recipe.yaml", "pull.yaml"
# The first line of every file the operator renders: its values are data, and `${VAR}` in them is never expanded
# (a recipe tag "${AWS_SECRET_ACCESS_KEY}" must not become the secret).
RENDERED_MARKER = "# Rendered by wmtp-operator: values are data; ${...} is not expanded.\n"

# The status subresource rank 0 patches. It writes only `status.<REPORT_FIELD>`: {attempt, step, loss,
# latestCheckpoint}. The operator copies what it accepts from there into fields it owns, so nothing a trainer
# writes can steer it: a report of another attempt, or a checkpoint outside the run's root, is ignored.
STATUS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}/status"
REPORT_FIELD = "report"
REPORTED_FIELDS: tuple[str, ...] = ("attempt", "step", "loss", "latestCheckpoint")

# The trainer's last words, read by the operator from the container's terminated state (the kubelet copies the
# file into `state.terminated.message`). One JSON object, at most TERMINATION_MESSAGE_MAX bytes, with the keys
# TERMINATION_FIELDS:
#   {"reason": STOP_PREEMPTED | STOP_FAILED | STOP_SUCCEEDED, "step": int | null, "checkpoint": uri | null,
#    "message": str, "warnings": [str, ...], "exitCode": int}
# `checkpoint` is the newest committed checkpoint the process knows (or the one it resumed from); `warnings` are
# what went wrong without failing the run (a failed MLflow registration, a fallback resume), one Event each;
# `exitCode` is the trainer's own ExitCode (torchrun would turn any worker failure into 1).
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_MAX = 4096  # what the kubelet keeps
TERMINATION_REASON, TERMINATION_STEP, TERMINATION_CHECKPOINT = "reason", "step", "checkpoint"
TERMINATION_MESSAGE, TERMINATION_WARNINGS, TERMINATION_EXIT_CODE = "message", "warnings", "exitCode"
TERMINATION_FIELDS: tuple[str, ...] = (
    TERMINATION_REASON, TERMINATION_STEP, TERMINATION_CHECKPOINT, TERMINATION_MESSAGE, TERMINATION_WARNINGS,
    TERMINATION_EXIT_CODE,
)  # fmt: skip
# `wmtp eval` leaves the same message (reason STOP_SUCCEEDED, or STOP_FAILED with its one-line error), and on
# success adds TERMINATION_EVAL: the headline results, never per-problem data:
#   {"tasks": {task: {"problems": int, "pass@<k>": float, ...}},
#    "speed": {"speedup": float, "mean_accepted": float, "identical": bool, ...} | null, "mlflow_run_id": str | null}
TERMINATION_EVAL = "eval"
STOP_PREEMPTED = "Preempted"  # stopped on SIGTERM after a committed checkpoint: not a failure
STOP_FAILED = "Failed"
STOP_SUCCEEDED = "Succeeded"

# The trainer container's entry point (PID 1): starts torchrun and passes SIGTERM to the training processes
# themselves, waiting up to the grace period for their checkpoint, so neither torchrun's nor any other 30 s
# timeout cuts a save short; it writes the termination message and exits with the workers' meaning (75 for a
# preemption, where torchrun alone would exit 1). Usage: LAUNCH_COMMAND + [--grace-seconds N --] + torchrun args.
LAUNCH_COMMAND: tuple[str, ...] = ("wmtp", "launch")
# Seconds the launcher gives the workers' SIGTERM save before it kills them (default 300); pass a little less than
# the pod's terminationGracePeriodSeconds, so that the launcher still writes the termination message.
LAUNCH_GRACE_FLAG = "--grace-seconds"

# `wmtp train --resume <checkpoint> RESUME_FALLBACK_FLAG`: the resume was chosen by the operator, so when that
# checkpoint is gone or damaged the trainer resumes from the newest intact one instead (and says which). A
# resume a user named fails loudly instead (exit 2).
RESUME_FALLBACK_FLAG = "--resume-fallback"

# What `--resume` (and a WMTPRun's spec.resume) takes besides a checkpoint URI: `auto` (the newest intact
# checkpoint if any), `never`, `latest` (the newest, which must exist), or RESUME_STEP_PREFIX + a step number.
RESUME_AUTO, RESUME_NEVER, RESUME_LATEST = "auto", "never", "latest"
RESUME_KEYWORDS: tuple[str, ...] = (RESUME_AUTO, RESUME_NEVER, RESUME_LATEST)
RESUME_STEP_PREFIX = "step_"
RESUME_HELP = "auto (the latest checkpoint if any) | never | latest | step_N | a checkpoint URI"

# The trainer's command lines as the operator renders them. `wmtp.cli` declares its options with these names and
# a test parses every rendered argv with the CLI itself, so the two sides cannot drift apart.
PULL_SPEC_FLAG = "--spec"
CONFIG_FLAG, RECIPE_FLAG, RESUME_FLAG = "--config", "--recipe", "--resume"
EVAL_COMMAND: tuple[str, ...] = ("wmtp", "eval")
EVAL_MODEL_FLAG, EVAL_EXPERIMENT_FLAG, EVAL_DATASET_FLAG = "--model", "--experiment", "--dataset"


# Files that hold a model's weights, by how their names end; everything else in a model folder (config.json,
# tokenizer files, Meta's params.json, mtp.json, the safetensors index) is what every rank reads. Distributed,
# global rank 0 alone reads weights: the other ranks build each model on the meta device from those small files
# and receive their shards from rank 0 (`wmtp.distributed.load_weights`). So a pull-spec entry may carry
# PULL_WEIGHTS: PULL_WEIGHTS_RANK0, and `wmtp pull` then leaves these files out on any node rank (ENV_NODE_RANK)
# but 0, whose pod holds global rank 0; without a node rank it pulls everything.
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
PULL_WEIGHTS = "weights"  # the pull-spec key
PULL_WEIGHTS_ALL, PULL_WEIGHTS_RANK0 = "all", "rank0"  # its values; PULL_WEIGHTS_ALL is the default


def is_weight_file(name: str) -> bool:
    """Whether the file `name` (a path or a key) holds weights that only rank 0 reads."""
    return name.endswith(WEIGHT_SUFFIXES)


def pull_command(spec_file: str) -> list[str]:
    """The init container's command: pull what `spec_file` lists."""
    return ["wmtp", "pull", PULL_SPEC_FLAG, spec_file]


def launch_args(grace_seconds: int, torchrun_args: list[str]) -> list[str]:
    """LAUNCH_COMMAND's arguments: its grace for the workers' save, then torchrun's own."""
    return [LAUNCH_GRACE_FLAG, str(grace_seconds), "--", *torchrun_args]


def train_module_args(config: str, recipe: str, resume: str, fallback: bool) -> list[str]:
    """torchrun's module and `wmtp train`'s arguments; `fallback` when the operator, not a user, chose `resume`."""
    args = ["-m", "wmtp", "train", CONFIG_FLAG, config, RECIPE_FLAG, recipe, RESUME_FLAG, resume]
    return [*args, RESUME_FALLBACK_FLAG] if fallback else args


class ExitCode(IntEnum):
    """What a `wmtp` process's exit status means (torchrun reports the worker's in its error file)."""

    OK = 0
    ERROR = 1  # an unexpected error; `wmtp pull`: a transfer or verification failed after retries
    BAD_INPUT = 2  # config, recipe, arguments, spec, dataset, model or --resume: the message names the field or file
    NOT_FOUND = 3  # an s3:// bucket, key or prefix missing
    DENIED = 4  # access denied or no credentials (S3, MLflow, a local file's permissions)
    UNREACHABLE = 5  # the S3 endpoint or the MLflow server cannot be reached
    PREEMPTED = 75  # stopped on SIGTERM after saving a checkpoint; resuming continues where it stopped


# ----------------------------------------------------------------------------- evaluation

# The code tasks `wmtp eval` scores (`wmtp.eval.tasks` loads them; a WMTPRun's spec.eval offers them), with what
# each is. The bundled ones ship with the trainer; the others need their dataset's URI.
EVAL_TASKS: dict[str, str] = {
    "humaneval": "HumanEval: 164 Python functions from their docstrings (bundled with the trainer)",
    "mbpp": "MBPP: short Python programs from a description and tests (full or sanitized records; give its URI)",
}
EVAL_BUNDLED: tuple[str, ...] = ("humaneval",)
# The speed headline TERMINATION_EVAL["speed"] carries (`wmtp eval`'s names), with each value's type; the operator
# copies them into status.eval.speed.
EVAL_SPEED_FIELDS: dict[str, type] = {
    "speedup": float, "mean_accepted": float, "tokens_per_pass": float, "identical": bool,
    "greedy_tokens_per_s": float, "speculative_tokens_per_s": float, "prompts": int,
}  # fmt: skip
MAX_EVAL_SCORES = 16  # pass@k values per task in the termination message and status.eval
# An MLflow run id (32 hex digits by default), as the final model's marker and status.eval name it.
MLFLOW_RUN_ID = r"^[A-Za-z0-9_-]{1,64}$"

# ----------------------------------------------------------------------------- checkpoint layout

CHECKPOINT_PREFIX = "checkpoint_step_"
COMMITTED = "COMMITTED"
FINAL_DIR = "final"


def step_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"
