"""The speed-up of self-speculative decoding, as a figure a user can trust.

- The baseline is the fastest greedy path for one sequence: cached, head 0 only, logits at the last position only.
  Both paths decode one prompt at a time (self-speculative decoding is not batched).
- What the speed-up can be is set by the forward passes: greedy decoding makes one per token, self-speculative
  decoding `tokens_per_pass` tokens per pass on average. A verifying pass costs at least a greedy pass (it runs
  more positions, and the extra heads), so a measured speed-up above `tokens_per_pass` (with a margin for timing
  noise) is not a speed-up but a bug in what is compared, and is flagged as one (`speedup_suspect`).
- One wall-clock timing is noise on a shared machine: every prompt is decoded both ways in each of `rounds`
  rounds, alternating which goes first, after one untimed warm-up; the speed-up is the median of the rounds'
  ratios, with their spread.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

from wmtp.eval.decoding import Decoder, Generation

log = logging.getLogger(__name__)

# How far the measured speed-up may exceed what the passes saved explain before it is called a bug.
SUSPECT_MARGIN = 1.2


def measure_speed(
    decoder: Decoder, prompts: Sequence[tuple[list[int], Sequence[str]]], rounds: int = 3
) -> dict[str, Any]:
    """Greedy and self-speculative decoding of the same (prompt, stop strings): tokens/s, passes, and whether
    the outputs are identical."""
    if not prompts or rounds < 1:
        raise ValueError("measure_speed needs at least one prompt and one round")
    # Warm-up, untimed: the first calls pay for allocations and lazy initialisation.
    decoder.greedy(*prompts[0])
    decoder.speculative(*prompts[0])
    seconds: dict[str, list[float]] = {"greedy": [], "speculative": []}
    runs: dict[str, list[Generation]] = {}
    identical = True
    for round_ in range(rounds):
        runs = {"greedy": [], "speculative": []}
        for i, (prompt, stop) in enumerate(prompts):
            order = ("greedy", "speculative") if (round_ + i) % 2 == 0 else ("speculative", "greedy")
            for path in order:
                runs[path].append(getattr(decoder, path)(prompt, stop))
        for path, done in runs.items():
            seconds[path].append(sum(g.seconds for g in done))
        identical &= all(g.tokens == s.tokens for g, s in zip(runs["greedy"], runs["speculative"], strict=True))
    return speed_report(runs, seconds, identical, decoder.model.n_heads)


def speed_report(
    runs: dict[str, list[Generation]], seconds: dict[str, list[float]], identical: bool, heads: int
) -> dict[str, Any]:
    """The figures from one round's generations per path (`greedy`, `speculative`) and every round's seconds."""
    tokens = sum(len(g.tokens) for g in runs["greedy"])
    passes = {path: sum(g.passes for g in done) for path, done in runs.items()}
    ratios = [g / max(s, 1e-9) for g, s in zip(seconds["greedy"], seconds["speculative"], strict=True)]
    speedup = statistics.median(ratios)
    # Greedy makes one pass per token, so this is also greedy passes / self-speculative passes.
    tokens_per_pass = tokens / max(passes["speculative"], 1)
    suspect = speedup > tokens_per_pass * SUSPECT_MARGIN
    if suspect:
        log.warning(
            "the measured speed-up %.2fx is more than %.2f tokens per pass can explain: the two paths do not do "
            "the same work (a bug in the measurement, not a speed-up)", speedup, tokens_per_pass,
        )  # fmt: skip
    return {
        "prompts": len(runs["greedy"]),
        "tokens": tokens,
        "identical": identical,
        "greedy_tokens_per_s": tokens / statistics.median(seconds["greedy"]),
        "speculative_tokens_per_s": tokens / statistics.median(seconds["speculative"]),
        "speedup": speedup,
        "speedup_spread": [min(ratios), max(ratios)],
        "rounds": len(ratios),
        "tokens_per_pass": tokens_per_pass,
        # Tokens kept per verifying pass (every pass but each prompt's first, which only drafts).
        "mean_accepted": tokens / max(passes["speculative"] - len(runs["speculative"]), 1),
        "passes": passes,
        "speedup_suspect": suspect,
        # What a self-speculative pass costs in greedy passes (speedup = tokens_per_pass / pass_cost): about 1 where
        # decoding is memory-bound (a GPU), about the tokens verified where it is compute-bound (a CPU).
        "pass_cost": tokens_per_pass / max(speedup, 1e-9),
        "heads": heads,
    }
