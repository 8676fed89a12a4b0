"""Decoding: cached, batched and self-speculative decoding give the tokens of plain uncached greedy decoding; the
speed-up report flags what the passes saved cannot explain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from wmtp.eval.decoding import Decoder, Generation
from wmtp.eval.speed import speed_report
from wmtp.models import MTPModel, load_tokenizer

PROMPTS = ("def fib(n):\n", "import os\nclass Path:", "while True:")
MAX_NEW = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mtp(tiny_models: dict[str, Path], perturb: float, head_type: str = "block") -> tuple[MTPModel, object]:
    torch.manual_seed(3)
    model = MTPModel.from_pretrained(tiny_models["base"], n_heads=4, head_type=head_type)
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval(), load_tokenizer(tiny_models["base"])


@torch.no_grad()
def reference(
    model: MTPModel, tokenizer: object, prompt: list[int], stop: Sequence[str] = (), eos: int = -1
) -> list[int]:
    """Greedy decoding as plainly as it can be written: the whole sequence through the HF model at every step, the
    whole completion's text searched for the stop strings."""
    out: list[int] = []
    while len(out) < MAX_NEW:
        out.append(int(model.base(torch.tensor([prompt + out]), use_cache=False).logits[0, -1].argmax()))
        if out[-1] == eos or any(s in tokenizer.decode(out, skip_special_tokens=True) for s in stop):
            break
    return out


@pytest.mark.parametrize("perturb", [0.0, 0.05, 1.0])
def test_cached_batched_and_speculative_decoding_give_the_uncached_greedy_tokens(
    tiny_models: dict[str, Path], perturb: float
) -> None:
    model, tokenizer = tiny_mtp(tiny_models, perturb)
    decoder = Decoder(model, tokenizer, max_new_tokens=MAX_NEW, stop_at_eos=False)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # the batch is left-padded
    batch = decoder.generate(prompts, [()] * len(prompts))
    for prompt, batched in zip(prompts, batch, strict=True):
        expected = reference(model, tokenizer, prompt)
        greedy, speculative = decoder.greedy(prompt), decoder.speculative(prompt)
        assert greedy.tokens == batched.tokens == speculative.tokens == expected
        assert greedy.passes == len(expected) == MAX_NEW
        # One pass drafts before any verifies: never more than one pass beyond greedy, never over 4 tokens a pass.
        assert MAX_NEW / 4 <= speculative.passes <= MAX_NEW + 1


def test_stop_strings_and_eos_end_each_row_of_a_batch_where_greedy_decoding_alone_ends_it(
    tiny_models: dict[str, Path],
) -> None:
    model, tokenizer = tiny_mtp(tiny_models, 0.05)
    decoder = Decoder(model, tokenizer, max_new_tokens=MAX_NEW)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    free = [reference(model, tokenizer, p) for p in prompts]
    # Row 0 stops at a string of several tokens, row 1 at "end of sequence" (made a token it reaches after 5+ new
    # tokens), row 2 may run to max_new_tokens; the samples of one prompt (rows 3 and 4) share its prefill.
    stop = tokenizer.decode(free[0][5:8])
    at = next(i for i in range(5, MAX_NEW) if free[1][i] not in free[1][:i])
    decoder.eos = frozenset({free[1][at]})
    rows = [prompts[0], prompts[1], prompts[2], prompts[0], prompts[0]]
    stops = [(stop,), (), (), (stop,), ("\x00never",)]
    batch = decoder.generate(rows, stops)
    expected = [reference(model, tokenizer, p, s, eos=free[1][at]) for p, s in zip(rows, stops, strict=True)]
    assert [g.tokens for g in batch] == expected
    assert [decoder.speculative(p, s).tokens for p, s in zip(rows, stops, strict=True)] == expected
    assert len(expected[0]) < MAX_NEW and len(expected[1]) == at + 1 and expected[0] != expected[4]
    assert stop not in decoder.text(batch[0].tokens, stops[0])


def test_a_rejected_draft_is_cropped_from_the_cache(tiny_models: dict[str, Path]) -> None:
    # Zero linear heads draft token 0 at every position: every draft is wrong on purpose, so each verifying pass
    # keeps one token and crops the other three from the cache; the output must not notice.
    model, tokenizer = tiny_mtp(tiny_models, 0.0, head_type="linear")
    with torch.no_grad():
        for head in model.extra_heads:
            head.weight.zero_()
    decoder = Decoder(model, tokenizer, max_new_tokens=MAX_NEW, stop_at_eos=False)
    for text in PROMPTS:
        prompt = tokenizer(text)["input_ids"]
        expected = reference(model, tokenizer, prompt)
        assert 0 not in expected  # so that no draft is right by chance
        speculative = decoder.speculative(prompt)
        assert speculative.tokens == expected and speculative.passes == MAX_NEW + 1


def test_sampling_a_batch_is_seeded_and_each_row_stops_on_its_own(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = tiny_mtp(tiny_models, 0.0)
    decoder = Decoder(model, tokenizer, max_new_tokens=MAX_NEW)
    prompt = tokenizer(PROMPTS[0])["input_ids"]

    def sample(seed: int) -> list[list[int]]:
        runs = decoder.generate([prompt] * 4, [("\n",)] * 4, 1.0, torch.Generator().manual_seed(seed))
        return [run.tokens for run in runs]

    first = sample(0)
    assert sample(0) == first and sample(1) != first and len({tuple(t) for t in first}) > 1
    assert all("\n" not in decoder.text(t, ("\n",)) and len(t) <= MAX_NEW for t in first)


def generations(tokens: int, passes: int, seconds: float) -> list[Generation]:
    return [Generation([0] * tokens, passes, seconds)]


@pytest.mark.parametrize(
    ("greedy_s", "speculative_s", "passes", "speedup", "suspect"),
    [
        ([2.0, 2.2, 1.8], [1.0, 1.0, 1.0], 50, 2.0, False),  # 2 tokens per pass, 2x: what the passes explain
        ([1.0, 1.0, 1.0], [1.1, 1.0, 0.9], 100, 1.0, False),  # nothing accepted, no gain
        ([6.2, 6.0, 6.1], [1.0, 1.0, 1.0], 98, 6.1, True),  # 6x at ~1 token per pass: a bug, not a speed-up
    ],
)
def test_a_speed_up_the_passes_saved_cannot_explain_is_flagged(
    greedy_s: list[float], speculative_s: list[float], passes: int, speedup: float, suspect: bool
) -> None:
    runs = {"greedy": generations(100, 100, 0.0), "speculative": generations(100, passes, 0.0)}
    report = speed_report(runs, {"greedy": greedy_s, "speculative": speculative_s}, True, 4)
    assert report["speedup"] == pytest.approx(speedup, rel=0.02) and report["speedup_suspect"] is suspect
    assert report["rounds"] == 3 and report["speedup_spread"][0] <= report["speedup"] <= report["speedup_spread"][1]
    assert report["tokens_per_pass"] == pytest.approx(100 / passes)
    assert report["pass_cost"] == pytest.approx(report["tokens_per_pass"] / report["speedup"])
