"""What `wmtp eval` is asked to do: its options, and a WMTPRun's spec.eval, are these fields (flags match names)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wmtp import contract
from wmtp.config.uris import Location

EvalTask = Literal[tuple(contract.EVAL_TASKS)]  # type: ignore[valid-type]
_NEEDS_DATA = [task for task in contract.EVAL_TASKS if task not in contract.EVAL_BUNDLED]


class EvalSettings(BaseModel):
    """pass@k on code tasks, and the speed-up of self-speculative decoding."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[Annotated[EvalTask, Field(description="A task's name.")]] = Field(
        default_factory=lambda: ["humaneval"],
        min_length=1,
        max_length=len(contract.EVAL_TASKS),
        description=f"Code tasks to score: {'; '.join(f'{n}: {what}' for n, what in contract.EVAL_TASKS.items())}.",
        json_schema_extra={"default": ["humaneval"]},
    )
    k: list[Annotated[int, Field(ge=1, le=1000, description="One k of pass@k.")]] = Field(
        default_factory=lambda: [1],
        min_length=1,
        max_length=8,
        description="The k of pass@k, each at most samples.",
        json_schema_extra={"default": [1]},
    )
    samples: int = Field(1, ge=1, le=1000, description="Completions per problem: 1 is greedy, more are sampled.")
    limit: int | None = Field(None, ge=1, description="At most this many problems per task. Unset: all of them.")
    temperature: float = Field(0.8, ge=0.01, le=5.0, description="Sampling temperature when samples > 1.")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Longest completion, in tokens.")
    datasets: dict[EvalTask, Location] = Field(
        default_factory=dict,
        description=f"Task → URI of its data (.jsonl/.jsonl.gz, a folder or a prefix); {', '.join(_NEEDS_DATA)} "
        "needs one.",
        json_schema_extra={"maxProperties": len(contract.EVAL_TASKS), "default": {}},
    )
    program_timeout: float = Field(10.0, ge=0.1, le=600, description="Seconds a program may run against its tests.")
    speed_prompts: int = Field(
        8, ge=0, le=1000, description="Prompts decoded greedily and self-speculatively for the speed-up; 0 skips."
    )
    seed: int = Field(0, ge=0, description="Seed of the sampling.")
    batch_size: int = Field(
        8, ge=1, le=256, description="Sequences decoded together: a problem's samples, or several problems."
    )
    chat_template: bool = Field(
        False, description="Ask in the tokenizer's chat template (instruct models); the answer ends at its end of turn."
    )
    extract_code: bool = Field(False, description="Score the first code block of each answer, not the whole answer.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalSettings:
        if max(self.k) > self.samples:
            raise ValueError(f"k {max(self.k)} is more than samples {self.samples}: pass@k needs k samples")
        missing = [task for task in self.tasks if task in _NEEDS_DATA and task not in self.datasets]
        if missing:
            raise ValueError(f"datasets.{missing[0]} is required: there is no bundled copy of {missing[0]}")
        return self
