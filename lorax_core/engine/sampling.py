"""Sampling parameters of one request, validated when they are made."""
from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (as vLLM): dividing logits by it overflows fp32


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (as transformers)
    presence_penalty: float = 0.0  # subtracted from a token's logit once it is in the output (OpenAI), -2..2
    frequency_penalty: float = 0.0  # subtracted once per time a token is in the output (OpenAI), -2..2
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before everything else (OpenAI)
    seed: int | None = None  # a per-request generator: the same seed gives the same tokens
    stop: list[str] | str | None = None  # the output ends before the first stop string (not included)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids)
        bias = self.logit_bias or {}
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (isinstance(bias, dict) and all(isinstance(t, int) and t >= 0 and isinstance(b, (int, float))
                                            and -100 <= b <= 100 for t, b in bias.items()),
             f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias!r}"),
            (self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64),
             f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
