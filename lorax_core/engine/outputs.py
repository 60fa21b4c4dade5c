"""What generate() returns and stream() yields."""
from __future__ import annotations

import dataclasses

from lorax_core.engine.sequence import TokenLogprob


@dataclasses.dataclass
class RequestMetrics:
    """When the request arrived, was first scheduled, got its first token and finished (time.monotonic s), and its
    token counts."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to first being scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # the completion (stop / eos token included when it ended the sequence)
    text: str  # the completion detokenized, cut before a stop string ("" without a tokenizer)
    finish_reason: str | None  # "stop" | "length" | "error" | "abort"
    adapter: str | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # why the request was refused or failed (finish_reason "error")
    metrics: RequestMetrics | None = None


@dataclasses.dataclass
class StreamDelta:
    """New output of one request since the previous delta; finish_reason is set on the last one."""

    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
    metrics: RequestMetrics | None = None  # on the last delta

    @classmethod
    def join(cls, deltas: list[StreamDelta]) -> StreamDelta:
        """One delta holding the text, token ids and logprobs of `deltas` in order, with the last one's finish
        reason, error and metrics."""
        last = deltas[-1]
        logprobs = [lp for d in deltas for lp in d.logprobs or []] if last.logprobs is not None else None
        return cls(last.request_id, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                   last.finish_reason, logprobs, last.error, last.metrics)


class RequestError(ValueError):
    """Some requests of a generate() call were refused; `outputs` holds every request's output (the refused
    ones with finish_reason "error"), so the others are not lost."""

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs
