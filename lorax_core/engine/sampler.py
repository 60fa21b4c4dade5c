"""Next-token choice for a batch of rows, each with its own sampling parameters."""
from __future__ import annotations

import torch

from lorax_core.engine.sequence import Sequence, TokenLogprob


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Pick each row's next token (logits fp32 [B, vocab]); records logprobs on sequences that asked for them.

    Order as in transformers: repetition penalty, temperature, top-k, top-p, min-p; greedy rows take the argmax
    after the repetition penalty. Seeded rows draw from their own generator.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
    if any(s.params.repetition_penalty != 1.0 for s in seqs):
        logits = _repetition_penalty(logits.clone(), seqs)  # the caller's logits stay as they were
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = _filtered_probs(logits[rows], [seqs[i].params for i in sampled])
        tokens[rows] = _draw(probs, [seqs[i].generator for i in sampled])
    if logprobs is not None:
        _record_logprobs(logprobs, tokens, seqs)
    return tokens.tolist()


def _repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for i, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    dev = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=dev).clamp(max=logits.shape[1])
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=dev).unsqueeze(0)
    remove = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
    min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax(p / E) with E ~ Exp(1) is a draw from p (seeded rows use their generator)."""
    noise = torch.empty(probs.shape, dtype=torch.float32)
    for i, gen in enumerate(generators):
        noise[i].exponential_(generator=gen)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def _record_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> None:
    """Logprobs of the model's distribution (before penalties and temperature), as OpenAI and vLLM report them."""
    k = max(s.params.logprobs or 0 for s in seqs)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    token_list, top_values, top_ids = tokens.tolist(), top_values.tolist(), top_ids.tolist()
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is not None:
            seq.logprobs.append(TokenLogprob(token_list[i], chosen[i], dict(zip(top_ids[i][:n], top_values[i][:n]))))
