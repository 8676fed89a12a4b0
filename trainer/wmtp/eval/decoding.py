"""Decoding with a multi-token model: greedy and sampled (batched), and self-speculative (blockwise parallel) greedy.

Every path keeps a KV cache (`MTPCache`: the trunk's and the block heads'), so a step costs the new positions
only, and computes logits for the positions it reads, never for the whole prefix.

Batches are left-padded (attention mask and position ids from it), so every row's next token is read at the last
position; a row leaves the batch, cache included, as soon as it stops. Identical prompts (one problem's samples)
share one prefill. Greedy decoding in a batch gives the tokens it gives alone (tested in float32; low-precision
kernels may round differently at another batch shape, and a near tie may then go the other way).

Self-speculative decoding (Stern et al. 2018; Gloeckle et al. 2024): the extra heads draft the next tokens, and one
cached forward pass over the drafted tokens verifies them with head 0; the longest drafted prefix that greedy
decoding would have produced is kept, plus head 0's own next token, and the cache is cropped back to what was
kept. The output is exactly the greedy output; what changes is the number of forward passes.

Stop strings are looked for in the new text only: each check decodes a tail window of tokens, long enough to hold
any stop string, so its cost does not grow with the completion.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wmtp.models import MTPCache, MTPModel

# Extra tokens decoded before a stop string's possible start: a tokenizer may render a window's first token
# differently (a SentencePiece word's leading space, half of a multi-byte character).
_STOP_MARGIN = 4


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    passes: int  # forward passes of the model that produced them
    seconds: float  # from the start of the call until this sequence stopped

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / max(self.passes, 1)


class Stopping:
    """Where one completion ends: an end-of-sequence token, a stop string in its text, or `max_new_tokens`."""

    def __init__(self, tokenizer: object, eos: frozenset[int], stop: Sequence[str], max_new_tokens: int) -> None:
        self.tokenizer, self.eos, self.stop, self.max_new_tokens = tokenizer, eos, tuple(stop), max_new_tokens
        # Every token is at least one byte (byte-level BPE, SentencePiece byte fallback), so a stop string of b
        # bytes ends within the last b tokens that hold it.
        self.window = max((len(s.encode()) for s in self.stop), default=0) + _STOP_MARGIN

    def done(self, tokens: list[int]) -> bool:
        """Whether `tokens` end here, given that they did not end one token earlier."""
        if tokens[-1] in self.eos or len(tokens) >= self.max_new_tokens:
            return True
        if not self.stop:
            return False
        tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=True)  # type: ignore[attr-defined]
        return any(s in tail for s in self.stop)

    def extend(self, out: list[int], new: Sequence[int]) -> bool:
        """Append `new` one token at a time as greedy decoding would, stopping where it would stop."""
        for token in new:
            out.append(int(token))
            if self.done(out):
                return True
        return False


class Decoder:
    """Generates continuations of token prompts until an end-of-sequence token, a stop string or `max_new_tokens`."""

    def __init__(self, model: MTPModel, tokenizer: object, max_new_tokens: int = 256, stop_at_eos: bool = True) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.eos = _eos_ids(model, tokenizer) if stop_at_eos else frozenset()

    def stopping(self, stop: Sequence[str] = ()) -> Stopping:
        return Stopping(self.tokenizer, self.eos, stop, self.max_new_tokens)

    def text(self, tokens: list[int], stop: Sequence[str] = ()) -> str:
        """The completion's text, cut at the first stop string."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
        return text[:cut]

    def greedy(self, prompt: list[int], stop: Sequence[str] = ()) -> Generation:
        """One prompt, greedily: the baseline self-speculative decoding is measured against."""
        return self.generate([prompt], [tuple(stop)])[0]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[list[int]],
        stops: Sequence[Sequence[str]],
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Generation]:
        """Decode `prompts` as one batch: greedy when `temperature` is None, else sampled with `generator` (CPU)."""
        started = time.perf_counter()
        stopping = [self.stopping(stop) for stop in stops]
        out: list[list[int]] = [[] for _ in prompts]
        ended: list[float] = [0.0] * len(prompts)
        cache = MTPCache(self.model, n_heads=1)  # greedy and sampling read head 0 only
        ids, mask, positions, rows = self._prefill_inputs(prompts)
        hidden = self._last_hidden(ids, mask, positions, cache)
        if rows is not None:  # one prefill per distinct prompt, copied to each of its rows
            cache.select(rows)
            hidden, mask, positions = hidden[rows], mask[rows], positions[rows]
        live = list(range(len(prompts)))  # the prompt of each batch row still decoding
        while True:
            tokens = self._pick(self.model.unembed(hidden).float(), temperature, generator)
            keep = []
            for i, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
                out[row].append(token)
                if stopping[row].done(out[row]):
                    ended[row] = time.perf_counter() - started
                else:
                    keep.append(i)
            if not keep:
                return [Generation(o, len(o), s) for o, s in zip(out, ended, strict=True)]
            if len(keep) < len(live):
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                tokens, mask, positions = tokens[index], mask[index], positions[index]
                live = [live[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
            hidden = self._last_hidden(tokens[:, None], mask, positions, cache)

    def _last_hidden(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: MTPCache) -> Tensor:
        """Head 0's hidden state at the last position of each row, [B, D]: the only one whose logits are needed."""
        return self.model(ids, attention_mask=mask, position_ids=positions, cache=cache)[0][:, -1]

    def _prefill_inputs(self, prompts: Sequence[list[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Distinct prompts left-padded to one length: ids, attention mask, position ids, and the distinct prompt
        each batch row copies (None when every prompt is distinct)."""
        distinct = list(dict.fromkeys(map(tuple, prompts)))
        width = max(len(p) for p in distinct)
        ids = torch.full((len(distinct), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for i, prompt in enumerate(distinct):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = None
        if len(distinct) < len(prompts):
            rows = torch.tensor([distinct.index(tuple(p)) for p in prompts], device=self.device)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device), rows

    @staticmethod
    def _pick(logits: Tensor, temperature: float | None, generator: torch.Generator | None) -> Tensor:
        if temperature is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)

    @torch.no_grad()
    def speculative(self, prompt: list[int], stop: Sequence[str] = ()) -> Generation:
        """Greedy output in fewer passes: draft with heads 1..K-1, verify with head 0 in one cached pass."""
        started, out, stopping = time.perf_counter(), [], self.stopping(stop)
        cache = MTPCache(self.model)
        heads = self.model(torch.tensor([prompt], device=self.device), cache=cache)
        draft = self._argmax_at(heads, -1)
        passes = 1
        while True:
            # draft[0] is head 0's own token, certain; draft[1:] are guesses for the tokens after it.
            kept = cache.length
            heads = self.model(torch.tensor([draft], device=self.device), cache=cache)
            passes += 1
            greedy = self.model.unembed(heads[0][0]).argmax(-1).tolist()  # greedy[i]: the token after draft[: i + 1]
            accepted = 1
            while accepted < len(draft) and draft[accepted] == greedy[accepted - 1]:
                accepted += 1
            if stopping.extend(out, draft[:accepted]):
                return Generation(out, passes, time.perf_counter() - started)
            cache.crop(kept + accepted)
            # The next draft from the last kept position: head 0's token there is known, the heads guess on.
            draft = [greedy[accepted - 1], *self._argmax_at(heads[1:], accepted - 1)]

    def _argmax_at(self, heads: list[Tensor], position: int) -> list[int]:
        """Each head's greedy token at one position of the (single) sequence."""
        return self.model.unembed(torch.stack([h[0, position] for h in heads])).argmax(-1).tolist()


def _eos_ids(model: MTPModel, tokenizer: object) -> frozenset[int]:
    """The tokenizer's end of sequence, and the model's own (an instruct model's end of turn may differ)."""
    ids = {tokenizer.eos_token_id}  # type: ignore[attr-defined]
    configured = getattr(getattr(model.base, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)
