"""From sampled tokens to what the consumer sees: text deltas, stop strings, EOS and length limits.

The output processor owns each sequence's detokenizer and stop matcher. It
decides *whether* a sequence ends and with which reason; the engine frees the
row (scheduler) and delivers the events.
"""

from __future__ import annotations

from .detokenize import IncrementalDetokenizer, StopMatcher
from .events import Delta, Finished
from .sequence import Sequence


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_context: int):
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.max_context = max_context

    def start(self, seq: Sequence) -> None:
        """A sequence was admitted: give it its text state."""
        seq.detok = IncrementalDetokenizer(self.tokenizer)
        seq.stops = StopMatcher(seq.params.stop)

    def accept(self, seq: Sequence, token: int) -> tuple[list[Delta], str | None]:
        """A token was sampled for ``seq`` (its position is in the cache when ``seq`` goes on).

        Returns the deltas to send now and the finish reason, None while the sequence goes on.
        """
        if seq.cancelled:
            return [], "cancelled"
        if token in self.eos:
            return [], "stop"
        seq.generated.append(token)
        seq.next_token = token
        text, stopped = seq.stops.feed(seq.detok.push(token))
        deltas = [Delta(text, len(seq.generated))] if text else []
        if stopped:
            return deltas, "stop"
        if len(seq.generated) >= seq.params.max_new_tokens or seq.length + 1 >= self.max_context:
            return deltas, "length"
        return deltas, None

    def finish(self, seq: Sequence, reason: str) -> list[object]:
        """The last events of a sequence: text held back for a stop string that never came, then Finished."""
        events: list[object] = []
        if reason != "cancelled" and seq.stops is not None:
            rest = seq.stops.flush()
            if rest:
                events.append(Delta(rest, len(seq.generated)))
        events.append(Finished(reason, len(seq.prompt_ids), len(seq.generated), seq.cached_tokens))
        return events
