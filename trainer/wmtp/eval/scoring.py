"""pass@k over a task: generate completions, run each against its tests in the sandbox, estimate pass@k.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples per problem of which c pass,
pass@k = 1 − C(n−c, k)/C(n, k), averaged over problems; greedy decoding is n = 1, k = 1.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wmtp.eval.sandbox import Limits, Outcome, run_program
from wmtp.eval.tasks import Problem

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 − Π_{i=n−c+1}^{n} (1 − k/i): the ratio of binomials without huge integers.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class ProblemResult:
    task_id: str
    outcomes: list[Outcome]
    completion: str  # the first sample, to read what the model wrote

    @property
    def correct(self) -> int:
        return sum(o.passed for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        reasons = Counter(o.reason for o in self.outcomes)
        return {"task_id": self.task_id, "n": len(self.outcomes), "correct": self.correct,
                "reasons": dict(reasons), "completion": self.completion}  # fmt: skip


@dataclass
class TaskResult:
    task: str
    ks: Sequence[int]
    problems: list[ProblemResult] = field(default_factory=list)

    def pass_at(self, k: int) -> float:
        scores = [pass_at_k(len(p.outcomes), p.correct, k) for p in self.problems]
        return float(np.mean(scores)) if scores else 0.0

    def sandboxes(self) -> set[str]:
        """The mechanisms that held its programs (`Outcome.sandbox`): one value unless the machine changed."""
        return {o.sandbox for p in self.problems for o in p.outcomes}

    def summary(self) -> dict[str, float]:
        return {f"pass@{k}": self.pass_at(k) for k in self.ks}


def score(
    task: str,
    problems: Sequence[Problem],
    complete: Callable[[Sequence[Problem]], list[list[str]]],
    ks: Sequence[int],
    limits: Limits = Limits(),
    workers: int = 4,
    group: int = 1,
    progress: Callable[[], None] = lambda: None,
) -> TaskResult:
    """Complete `group` problems at a time (`complete` returns each one's samples) and run each sample's program,
    `workers` at once. A group's programs run while the next group decodes."""
    result = TaskResult(task, ks)
    with ThreadPoolExecutor(workers, thread_name_prefix="wmtp-sandbox") as pool:
        running: list[tuple[Problem, list[str], list[Future[Outcome]]]] = []
        for start in range(0, len(problems), group):
            chunk = problems[start : start + group]
            decoded = []
            for problem, completions in zip(chunk, complete(chunk), strict=True):
                if max(ks) > len(completions):
                    got = len(completions)
                    raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem, not {got}")
                runs = [pool.submit(run_program, problem.solution(c), problem.test, limits) for c in completions]
                decoded.append((problem, completions, runs))
            _collect(running, result, progress)
            running = decoded
        _collect(running, result, progress)
    log.info("task=%s problems=%d %s", task, len(result.problems), result.summary())
    return result


def _collect(
    running: list[tuple[Problem, list[str], list[Future[Outcome]]]], result: TaskResult, progress: Callable[[], None]
) -> None:
    for problem, completions, runs in running:
        result.problems.append(ProblemResult(problem.task_id, [run.result() for run in runs], completions[0]))
        progress()
