"""Per-request sampling parameters and a batched sampler.

Every row of a batch may ask for different settings; the common case (all
greedy) costs one ``argmax``. Sampled rows share one sort for top-k/top-p and
then draw with their own seeded generator, so a request's output depends only
on its own seed, not on which other requests happen to share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 means greedy
    top_k: int | None = None          # None or 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, row: int, seen: torch.Tensor, penalty: float) -> None:
    """The CTRL penalty as in transformers: divide positive logits, multiply negative ones."""
    picked = logits[row, seen]
    logits[row, seen] = torch.where(picked > 0, picked / penalty, picked * penalty)


def sample(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor | None],
           generators: list[torch.Generator | None]) -> list[int]:
    """Pick the next token for each row of ``logits`` ([n, vocab])."""
    logits = logits.float()
    for row, p in enumerate(params):
        if p.repetition_penalty != 1.0 and seen[row] is not None and seen[row].numel():
            apply_repetition_penalty(logits, row, seen[row], p.repetition_penalty)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        sub = logits.index_select(0, index)
        temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        sub = sub / temps[:, None]
        sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True)
        ranks = torch.arange(sub.shape[-1], device=sub.device)[None, :]
        ks = torch.tensor([params[i].top_k or sub.shape[-1] for i in sampled], device=sub.device)
        drop = ranks >= ks[:, None]
        probs = sorted_logits.softmax(dim=-1)
        top_ps = torch.tensor([params[i].top_p for i in sampled], device=sub.device)
        drop |= (probs.cumsum(dim=-1) - probs) > top_ps[:, None]
        drop[:, 0] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        for j, row in enumerate(sampled):
            pick = torch.multinomial(probs[j], 1, generator=generators[row])
            chosen[row] = sorted_ids[j, pick[0]]
    return chosen.tolist()
