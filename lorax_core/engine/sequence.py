"""A Sequence carries one request from admission to its last token."""
from __future__ import annotations

import dataclasses
import enum
import itertools

import torch

from lorax_core.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the `logprobs` most likely token ids -> logprob (of the model's distribution)


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None):
        self.id = next(Sequence._ids)
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.adapter = adapter
        self.adapter_slot = -1  # the pool slot while running with an adapter
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose keys and values are in the KV cache
        self.chunk = 0  # tokens this step computes (set by the scheduler)
        # Async scheduling: tokens sampled by a step still on the device, not yet in token_ids. They count in
        # len(self): the next step's positions, KV slots and blocks follow them, and its input for the newest one
        # is gathered on the device from row `pending_row` of the last launched step's tokens.
        self.num_pending = 0
        self.pending_row = -1
        self.finish_reason: str | None = None  # "stop" | "length" | "error" | "abort"
        self.error: str | None = None
        self.text = ""  # detokenized completion (cut at a stop string)
        # incremental detokenization (detokenizer.py): text[:text_committed] is final, the text of completion tokens
        # [0, text_end); tokens [text_start, text_end) were the last committed
        self.text_committed = self.text_start = self.text_end = 0
        self.logprobs: list[TokenLogprob] = []
        # for the sampler's penalties, kept up to date by append and only for requests that use them: the tokens of
        # the prompt and output (repetition_penalty), the times each token is in the output (presence, frequency)
        self.seen_ids = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self.output_counts = {} if params.presence_penalty or params.frequency_penalty else None
        self._generator: torch.Generator | None = None  # a seeded request's, on the logits' device (generator())
        # times on the scheduler's clock (seconds)
        self.arrival_time = 0.0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded request's own random generator on `device` (made at its first draw), or None if unseeded."""
        if self.params.seed is None:
            return None
        if self._generator is None:  # a sequence lives on one engine: its device does not change
            self._generator = torch.Generator(device).manual_seed(_mixed(self.params.seed))
        return self._generator

    def __len__(self) -> int:
        """Tokens so far, those still on the device included."""
        return len(self.token_ids) + self.num_pending

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def samples(self) -> bool:
        """This step's chunk reaches the last token, so the step samples the next one."""
        return self.num_computed_tokens + self.chunk == len(self)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.seen_ids is not None:
            self.seen_ids.add(token_id)
        if self.output_counts is not None:
            self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    def finish(self, reason: str, error: str | None = None, when: float | None = None) -> None:
        self.status, self.finish_reason, self.error = Status.FINISHED, reason, error
        self.finished_time = when


def _mixed(seed: int) -> int:
    """The seed through splitmix64's finalizer, a bijection on 64 bits: the CPU generator keeps only 32 bits of its
    seed, so seeds 2**32 apart (or a request's seed and seed + j of its other choices, after some arithmetic) would
    draw alike; mixed first, any two seeds differ in those 32 bits but by chance."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
