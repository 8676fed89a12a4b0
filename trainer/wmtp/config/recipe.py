"""`Recipe`: the experiment (algorithm, data mix, loss, optimiser); the same file runs on a laptop or a cluster."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from wmtp import contract
from wmtp.config.base import Name, Strict, check_uri
from wmtp.config.uris import Root

Beta = Annotated[float, Field(ge=0, lt=1, description="One AdamW beta, in [0, 1).")]
MAX_SOURCES = 32  # datasets in one mix (a WMTPRun defines at most as many)


class RunSection(Strict):
    """The run's name and MLflow tags."""

    name: str = Field(
        description="Run name: names the run directory, checkpoint folder and MLflow run.",
        pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$",
        max_length=200,
    )
    # MLflow's own limits: a longer key or value fails the run at start.
    tags: dict[Annotated[str, Field(min_length=1, max_length=250)], Annotated[str, Field(max_length=5000)]] = Field(
        default_factory=dict, max_length=100, description="Extra MLflow tags."
    )


class TrainSection(Strict):
    """The algorithm and how long to train."""

    algo: str = Field(
        max_length=63, description="The algorithm: baseline-mtp, critic-wmtp, rho1-wmtp or a registered plugin."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; unset: run num_epochs epochs.")
    num_epochs: int = Field(1, ge=1, description="Epochs when max_steps is unset.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_interval: int = Field(50, ge=1, description="Evaluate held-out loss every this many steps.")
    head_warmup_steps: int = Field(
        0,
        ge=0,
        description="Converting a next-token model: the first this many optimizer steps train only the new heads "
        "(and the algorithm's own modules); the trunk and the shared unembedding get no update.",
    )
    train_only_extra_heads: bool = Field(
        False,
        description="Train only the new heads (and the algorithm's own modules) for the whole run: the trunk, head "
        "0 and the shared unembedding stay exactly as loaded, so the model predicts the next token as before and "
        "heads 1.. learn to draft for it (self-speculative decoding). Replaces head_warmup_steps.",
    )

    @field_validator("algo")
    @classmethod
    def _registered(cls, value: str) -> str:
        contract.algorithm(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_hold_the_base(self) -> TrainSection:
        if self.train_only_extra_heads and self.head_warmup_steps:
            raise ValueError("head_warmup_steps has no use with train_only_extra_heads: the base never trains")
        return self


class OptimSection(Strict):
    """The optimizer and its learning-rate schedule."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW decoupled weight decay.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null disables clipping.")
    scheduler: Literal["cosine", "constant"] = Field("cosine", description="LR schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    pretrained_lr_scale: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Learning-rate multiplier of the base model's own parameters (embeddings, trunk, head 0, "
        "unembedding); the new heads and the algorithm's modules take optim.lr.",
    )


DatasetFormat = Literal["mbpp", "codecontests", "humaneval", "jsonl"]
CodeLanguage = Literal["python3", "python2", "cpp", "java"]
DEFAULT_LANGUAGES: tuple[CodeLanguage, ...] = ("python3", "python2")


class DataSource(Strict):
    """One dataset of the mix: a name the config (or the WMTPRun's datasets) defines, and how to read it."""

    name: Name = Field(description="A key of the config's paths.datasets.")
    format: DatasetFormat | None = Field(None, description="Record layout; unset: the name if it is a known format.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many examples.")
    languages: list[Annotated[CodeLanguage, Field(description="A solution language.")]] = Field(
        default_factory=lambda: list(DEFAULT_LANGUAGES),
        min_length=1,
        max_length=len(get_args(CodeLanguage)),
        description="codecontests: accepted solution languages, most preferred first; a problem without a "
        "solution in one of them is skipped (and counted).",
    )

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return self.name if self.name in get_args(DatasetFormat) else "jsonl"


class DataSection(Strict):
    """The data mix and how examples become sequences."""

    sources: list[DataSource] = Field(min_length=1, max_length=MAX_SOURCES, description="Datasets to mix, by name.")
    max_length: int = Field(512, ge=8, le=1 << 20, description="Tokens per training sequence.")
    batch_size: int = Field(8, ge=1, le=1 << 20, description="Sequences per micro-batch (global, across ranks).")
    pack: bool = Field(True, description="Concatenate examples into full sequences instead of padding each.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of examples held out for evaluation.")


class ModelSection(Strict):
    """The shape of the extra output heads."""

    head_type: Literal["block", "linear"] = Field(
        "block", description="Extra heads: one transformer block each (Meta's layout) or a linear map."
    )


class LossSection(Strict):
    """The multi-token loss: heads, and how weights are bounded."""

    n_heads: int = Field(4, ge=1, le=16, description="Output heads; head k predicts token t+k+1.")
    # Below 1e-3 the scaled scores overflow float32 into NaN weights.
    temperature: float = Field(1.0, ge=1e-3, le=1e3, description="Softmax temperature for weights.")
    epsilon: float = Field(
        0.05, ge=0, le=1, description="Floor of the final weights (weights have mean 1, so at most 1)."
    )
    max_weight: float = Field(
        3.0, ge=1, description="Ceiling of the final weights (weights have mean 1, so at least 1)."
    )


class Rho1Section(Strict):
    """rho1-wmtp: which targets count, by their excess loss over the reference model."""

    selection_mode: Literal["topk", "weighted"] = Field("topk", description="Hard top-k selection or soft weights.")
    k_percent: float = Field(0.6, gt=0, le=1, description="topk: fraction of valid targets kept, by excess loss.")


class CriticSection(Strict):
    """critic-wmtp: the value head, its pretraining and the TD weights."""

    gamma: float = Field(0.99, ge=0, le=1, description="GAE discount.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    discount_lambda: float = Field(0.9, ge=0, le=1, description="λ_d in the TD delta δ_t = V_t − λ_d·V_{t−1}.")
    value_coef: float = Field(0.5, ge=0, le=1e3, description="Weight of the value-head MSE in the total loss.")
    pretrain_steps: int = Field(20, ge=0, description="Stage 1: value-head-only steps before MTP training.")
    pretrain_lr: float = Field(1e-3, gt=0, le=1, description="Stage 1 learning rate.")


class CheckpointingSection(Strict):
    """Checkpoint settings of the experiment; each one set here overrides the config's paths.checkpoints (and a
    `wmtp train` flag overrides it in turn: `wmtp.config.resolve_checkpointing`)."""

    checkpoint_path: Root | None = Field(None, description="Overrides the config's paths.checkpoints.base_path.")
    save_interval: int | None = Field(None, ge=1, description="Overrides paths.checkpoints.save_interval.")
    keep_last: int | None = Field(None, ge=1, description="Overrides paths.checkpoints.keep_last.")
    save_final: bool | None = Field(None, description="Overrides paths.checkpoints.save_final.")
    auto_resume_latest: bool = Field(False, description="Resume from the latest checkpoint when --resume is unset.")
    overwrite: bool = Field(
        False,
        description="Let a fresh start (--resume never, or nothing to resume) write into a run prefix that already "
        "holds committed checkpoints, replacing them step by step. Unset: such a start fails (exit 2) naming the "
        "prefix, so that a lost resume never overwrites a run's checkpoints.",
    )

    _uris = field_validator("checkpoint_path")(check_uri)


class Recipe(Strict):
    """What to train and how; the same file runs on a laptop or on a cluster."""

    run: RunSection
    train: TrainSection
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    rho1: Rho1Section = Field(default_factory=Rho1Section)
    critic: CriticSection = Field(default_factory=CriticSection)
    checkpointing: CheckpointingSection = Field(default_factory=CheckpointingSection)

    @model_validator(mode="after")
    def _extra_heads_to_train(self) -> Recipe:
        if self.train.train_only_extra_heads and self.loss.n_heads < 2:
            raise ValueError(
                "train.train_only_extra_heads needs loss.n_heads of 2 or more: one head has no extra heads"
            )
        return self
