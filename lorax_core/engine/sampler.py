"""Next-token choice for a batch of rows, each with its own sampling parameters.

`launch` enqueues a step's sampling on the logits' device and starts copying the tokens (and logprobs) to pinned
host memory; `Sampled.resolve` waits for that copy alone. Between the two the host may launch the next step, which
is what the engine's async scheduling does. `sample` is both at once.
"""
from __future__ import annotations

import dataclasses

import torch

from lorax_core.engine.sampling import SamplingParams
from lorax_core.engine.sequence import Sequence, TokenLogprob


@dataclasses.dataclass
class Sampled:
    """One step's sampled tokens (device tensor `tokens`, row i for seqs[i]) on their way to the host."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # int64 [S], on the logits' device: the next step's input ids are gathered from it
    _host: list[torch.Tensor]  # tokens, then chosen logprobs, top values and top ids when a row asked for logprobs
    _done: torch.cuda.Event | None  # recorded after the copies to the host (None: on the CPU, already there)

    def resolve(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for this step's copies (not for later work on the stream); each row's token and its logprobs
        record (None where the row did not ask for logprobs)."""
        if self._done is not None:
            self._done.synchronize()
        tokens = self._host[0].tolist()
        records: list[TokenLogprob | None] = [None] * len(tokens)
        if len(self._host) > 1:
            chosen, top_values, top_ids = (t.tolist() for t in self._host[1:])
            for i, seq in enumerate(self.seqs):
                n = seq.params.logprobs
                if n is not None:
                    records[i] = TokenLogprob(tokens[i], chosen[i], dict(zip(top_ids[i][:n], top_values[i][:n])))
        return tokens, records


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Pick each row's next token (logits fp32 [B, vocab]), waiting for them; records logprobs on sequences that
    asked for them. See `launch`."""
    tokens, records = launch(logits, seqs).resolve()
    for seq, record in zip(seqs, records):
        if record is not None:
            seq.logprobs.append(record)
    return tokens


def launch(logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
    """Enqueue the choice of each row's next token (logits fp32 [B, vocab]) and its copy to the host; nothing here
    waits for the device.

    Order as in transformers (and vLLM for OpenAI's logit bias and penalties): logit bias, repetition penalty,
    presence and frequency penalties, temperature, top-k, top-p, min-p; greedy rows take the argmax after the bias
    and penalties. Seeded rows draw from their own generator. The penalties read the tokens each sequence holds
    on the host, so the caller resolves earlier steps of a penalized sequence first.
    """
    logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
    if any(s.params.logit_bias or s.seen_ids is not None or s.output_counts is not None for s in seqs):
        logits = _adjusted(logits.clone(), seqs)  # the caller's logits stay as they were
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled and len(sampled) == len(seqs):
        tokens = _draw(logits, seqs)
    else:
        tokens = logits.argmax(dim=-1)
        if sampled:
            rows = _on(logits.device, sampled, torch.long)
            tokens[rows] = _draw(logits[rows], [seqs[i] for i in sampled])
    results = [tokens]
    if logprobs is not None:
        k = min(max(s.params.logprobs or 0 for s in seqs), logprobs.shape[1])  # a vocabulary may be under 20 tokens
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
        results += [logprobs.gather(1, tokens[:, None]).squeeze(1), top_values, top_ids]
    if logits.device.type != "cuda":
        return Sampled(seqs, tokens, results, None)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in results]
    done = torch.cuda.Event()
    done.record()
    return Sampled(seqs, tokens, host, done)


def _adjusted(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Logit bias (added), repetition penalty (transformers: a seen token's logit divided by it if positive, else
    multiplied), then presence and frequency penalties (OpenAI: minus presence + frequency * count for each output
    token), in place: a few ops for the whole batch each, over the tokens each row names or has seen."""
    bias = _entries(seqs, lambda seq: seq.params.logit_bias)
    if bias:
        at, amounts = _at(logits.device, bias)
        logits[at] += amounts
    repeats = _entries(seqs, lambda seq: seq.seen_ids and dict.fromkeys(seq.seen_ids, seq.params.repetition_penalty))
    if repeats:
        at, factor = _at(logits.device, repeats)
        scores = logits[at]
        logits[at] = torch.where(scores > 0, scores / factor, scores * factor)
    counted = _entries(seqs, lambda seq: seq.output_counts and {
        t: seq.params.presence_penalty + seq.params.frequency_penalty * n for t, n in seq.output_counts.items()})
    if counted:
        at, amounts = _at(logits.device, counted)
        logits[at] -= amounts
    return logits


def _entries(seqs: list[Sequence], values) -> list[tuple[int, dict[int, float]]]:
    """(row, {token id: value}) for each row whose `values(seq)` is not empty."""
    return [(i, v) for i, seq in enumerate(seqs) if (v := values(seq))]


def _at(device: torch.device, entries: list[tuple[int, dict[int, float]]]) -> tuple[tuple, torch.Tensor]:
    """The (rows, token ids) index of every entry's tokens on `device`, and their values (fp32)."""
    rows = [i for i, v in entries for _ in range(len(v))]
    ids = [t for _, v in entries for t in v]
    values = [x for _, v in entries for x in v.values()]
    return (_on(device, rows, torch.long), _on(device, ids, torch.long)), _on(device, values, torch.float32)


def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) after the row's top-k, top-p and min-p: the argmax of
    p / E with E ~ Exp(1) drawn per token is a draw from p.

    Only what some row asks for is computed: without filters there is no sort; with top-k in every row, the top
    max(k) tokens are sorted instead of the whole vocabulary (the others are removed anyway)."""
    params = [s.params for s in seqs]
    dev, vocab = logits.device, logits.shape[1]
    if any(p.temperature != 1.0 for p in params):
        logits = logits / _column(dev, [p.temperature for p in params])
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p <= 0.0 for p in params):
        return (logits.softmax(dim=-1) / _noise(logits.shape, dev, seqs)).argmax(dim=-1)
    if all(0 < p.top_k < vocab for p in params):
        top, order = logits.topk(max(p.top_k for p in params), dim=-1)  # sorted, largest first
    else:
        top, order = logits.sort(dim=-1, descending=True)
    probs = _filtered(top, params)
    picked = (probs / _noise(probs.shape, dev, seqs, order, vocab)).argmax(dim=-1, keepdim=True)
    return order.gather(1, picked).squeeze(1)


def _filtered(top: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities over the tokens of `top` (each row's logits sorted, largest first, possibly cut short) with
    those outside the row's top-k, top-p and min-p set to 0; the most likely token always stays."""
    dev, width = top.device, top.shape[1]
    remove = None
    if any(0 < p.top_k < width for p in params):
        ranks = torch.arange(width, device=dev).unsqueeze(0)
        remove = ranks >= _column(dev, [p.top_k if 0 < p.top_k < width else width for p in params], torch.long)
    probs = (top if remove is None else top.masked_fill(remove, float("-inf"))).softmax(dim=-1)
    cuts = []
    if any(p.top_p < 1.0 for p in params):  # keep the smallest prefix whose mass reaches top_p
        top_p = _column(dev, [p.top_p if p.top_p < 1.0 else float("inf") for p in params])  # inf: rounding
        cuts.append((probs.cumsum(dim=-1) - probs) >= top_p)  # cannot remove a row's tail without top-p
    if any(p.min_p > 0.0 for p in params):
        cuts.append(probs < _column(dev, [p.min_p for p in params]) * probs[:, :1])
    if not cuts:
        return probs
    for cut in cuts:
        remove = cut if remove is None else remove | cut
    remove[:, 0] = False
    return top.masked_fill(remove, float("-inf")).softmax(dim=-1)


def _column(device: torch.device, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [B, 1] tensor of per-row values."""
    return _on(device, values, dtype).unsqueeze(1)


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """values as a tensor on `device`, copied from pinned memory on a GPU: a copy from pageable memory may make the
    host wait for the stream, which async scheduling keeps busy with the step just launched."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _noise(shape: torch.Size, device: torch.device, seqs: list[Sequence], order: torch.Tensor | None = None,
           vocab: int = 0) -> torch.Tensor:
    """Exp(1) noise on the device for each token of `shape` ([rows, tokens]: the vocabulary, or the tokens `order`
    names out of `vocab`, sorted). Unseeded rows draw together from the global generator. A seeded row draws a
    whole vocabulary's noise from its own generator, in token order, and takes the entries `order` names: what it
    draws and which token gets which draw do not depend on the batch, so the same seed gives the same tokens
    whatever else shares the batch."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    if any(s.params.seed is None for s in seqs):
        noise.exponential_()
    for i, seq in enumerate(seqs):
        if seq.params.seed is not None:
            generator = seq.generator(device)
            if order is None:
                noise[i].exponential_(generator=generator)
            else:
                row = torch.empty(vocab, dtype=torch.float32, device=device).exponential_(generator=generator)
                noise[i] = row[order[i]]
    return noise
