"""Decoding with a multi-token model: greedy, sampled, and self-speculative (blockwise parallel) greedy.

Self-speculative decoding (Stern et al. 2018; Gloeckle et al. 2024): the extra heads draft the next tokens, head
0 verifies them in the next forward pass, and the longest drafted prefix that greedy decoding would have produced
is kept, plus head 0's own next token. The output is exactly the greedy output; what changes is the number of
forward passes. Neither path keeps a KV cache, so the two are compared like for like: the speed-up is the
passes saved, not a cache trick.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wmtp.models import MTPModel


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    passes: int  # forward passes of the model
    seconds: float

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / max(self.passes, 1)


class Decoder:
    """Generates continuations of a prompt until eos, a stop string or `max_new_tokens`."""

    def __init__(self, model: MTPModel, tokenizer: object, max_new_tokens: int = 256, stop: Sequence[str] = ()) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.stop = max_new_tokens, tuple(stop)
        self.eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.stop_at_eos = True
        self.device = next(model.parameters()).device

    def text(self, tokens: list[int]) -> str:
        """The completion's text, cut at the first stop string."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]

    def _done(self, tokens: list[int]) -> bool:
        if (tokens and tokens[-1] == self.eos and self.stop_at_eos) or len(tokens) >= self.max_new_tokens:
            return True
        if not self.stop:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        return any(s in text for s in self.stop)

    def _extend(self, out: list[int], new: Sequence[int]) -> bool:
        """Append `new` one token at a time as greedy decoding would, stopping where it would stop."""
        for token in new:
            out.append(int(token))
            if self._done(out):
                return True
        return False

    def _ids(self, prompt: list[int], out: list[int]) -> Tensor:
        return torch.tensor([prompt + out], dtype=torch.long, device=self.device)

    def _next_logits(self, prompt: list[int], out: list[int]) -> Tensor:
        # Head 0 is the base causal LM itself: the baseline runs no extra heads.
        return self.model.base(self._ids(prompt, out), use_cache=False).logits[0, -1].float()

    @torch.no_grad()
    def greedy(self, prompt: list[int]) -> Generation:
        started, out, passes = time.perf_counter(), [], 0
        while True:
            passes += 1
            if self._extend(out, [int(self._next_logits(prompt, out).argmax())]):
                return Generation(out, passes, time.perf_counter() - started)

    @torch.no_grad()
    def sample(self, prompt: list[int], temperature: float, generator: torch.Generator) -> Generation:
        started, out, passes = time.perf_counter(), [], 0
        while True:
            passes += 1
            probs = torch.softmax(self._next_logits(prompt, out) / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
            if self._extend(out, [token]):
                return Generation(out, passes, time.perf_counter() - started)

    def _head_argmax(self, ids: Tensor, positions: slice) -> Tensor:
        """[K, P]: each head's greedy token at the given positions."""
        heads = self.model(ids)
        return torch.stack([self.model.unembed(h[0, positions]).argmax(-1) for h in heads])

    @torch.no_grad()
    def speculative(self, prompt: list[int]) -> Generation:
        """Greedy output in fewer passes: draft with heads 1..K-1, verify with head 0."""
        started, out = time.perf_counter(), []
        draft = self._head_argmax(self._ids(prompt, out), slice(-1, None))[:, 0].tolist()
        passes = 1
        while True:
            # draft[0] is head 0's own token, certain; draft[1:] are guesses for the tokens after it.
            base = len(prompt) + len(out)
            predicted = self._head_argmax(self._ids(prompt, out + draft), slice(base, base + len(draft)))
            passes += 1
            greedy = predicted[0].tolist()  # greedy[i]: head 0's token after draft[: i + 1]
            accepted = 1
            while accepted < len(draft) and draft[accepted] == greedy[accepted - 1]:
                accepted += 1
            if self._extend(out, draft[:accepted]):
                return Generation(out, passes, time.perf_counter() - started)
            draft = predicted[:, accepted - 1].tolist()
