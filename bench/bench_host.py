"""Host time the engine spends on each step outside the model, against how it did the same work before, in one run.

1. Detokenization: decoding the whole completion at each step (the engine before the incremental detokenizer;
   the baseline) vs a window of a few tokens (lorax_core/engine/detokenizer.py), at completions of 100, 500 and
   2000 tokens; and one window's decode: transformers' `tokenizer.decode` (the baseline) vs the Rust tokenizer's
   (`text_decoder`).
2. A decode step's integer inputs (ids, positions, slots, block tables for 4096 positions, context lengths, adapter
   segments): a tensor and a copy per field (the model runner before step_inputs.py; the baseline) vs one packed
   buffer sent in one copy, at batch 1, 8 and 64.
3. On a GPU, a CUDA graph's static inputs: copies into each static tensor, padding included, about 16 small copy
   kernels (DecodeGraphs.run before step_inputs.py; the baseline) vs one copy into the bucket's buffer.
4. Sampling a step's tokens over a 32000-token vocabulary (temperature; top-p; top-k): the sampler before (the
   baseline: Exp(1) noise drawn on the CPU row by row and copied to the device, a sort of the whole vocabulary
   whatever the parameters) vs lorax_core/engine/sampler.py (noise drawn on the device, no sort without top-k /
   top-p / min-p, only the top k sorted when every row has top-k), at batch 1 and 64.

Microseconds per call: the median of 7 repeats of 200 calls, wall clock, with torch.cuda.synchronize after each
call on a GPU (so a copy's completion is included). `--tokenizer` takes a Hugging Face tokenizer (directory or hub
id); the default is a byte-level BPE tokenizer trained here on generated words. Writes host.md and host.json under
--out (default $OUT or bench/out). `python3 bench/bench_host.py` (bench/gpu.sh runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapters import device_header  # noqa: E402  (bench/conftest.py's, loaded by path)

from lorax_core.engine.cuda_graphs import Bucket  # noqa: E402
from lorax_core.engine.detokenizer import append_text, text_decoder  # noqa: E402
from lorax_core.engine.sampler import sample  # noqa: E402
from lorax_core.engine.sampling import SamplingParams  # noqa: E402
from lorax_core.engine.sequence import Sequence  # noqa: E402
from lorax_core.engine.step_inputs import StepBatch, upload  # noqa: E402

MAX_BLOCKS, BLOCK = 256, 16  # 4096 positions


def per_call_us(fn, calls: int, sync: bool) -> float:
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if sync:
                torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def tokenizer(name: str | None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name:
        return AutoTokenizer.from_pretrained(name)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(rng.choices(words, k=200)) for _ in range(500)],
                            trainers.BpeTrainer(vocab_size=8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def detokenization(tok, lengths=(100, 500, 2000)) -> list[dict]:
    rng = random.Random(1)
    text = " ".join("".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 9))) for _ in range(4000))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [detokenization_row(tok, ids, n) for n in lengths] + [window_row(tok, ids)]


def detokenization_row(tok, ids: list[int], n: int) -> dict:
    assert len(ids) > n + 200, "generated text too short"
    full = per_call_us(lambda: tok.decode(ids[:n], skip_special_tokens=True), 200, sync=False)
    seq, decode = Sequence([1], SamplingParams(), None), text_decoder(tok)
    for token in ids[:n]:  # the state after n tokens; each timed call then adds one more token
        seq.append(token)
        append_text(decode, seq)
    more = iter(ids[n:])

    def step():
        seq.append(next(more, ids[n]))
        append_text(decode, seq)

    window = per_call_us(step, 20, sync=False)  # 7 x 20 tokens past n
    return {"part": "detokenize a step", "case": f"completion of {n} tokens", "baseline_us": full, "lorax_us": window}


def window_row(tok, ids: list[int]) -> dict:
    """One window of 2 tokens (a step decodes two windows per sequence)."""
    window, decode = ids[10:12], text_decoder(tok)
    assert decode(window) == tok.decode(window, skip_special_tokens=True)
    return {"part": "decode a window of 2 tokens", "case": "transformers decode vs the Rust tokenizer's",
            "baseline_us": per_call_us(lambda: tok.decode(window, skip_special_tokens=True), 2000, sync=False),
            "lorax_us": per_call_us(lambda: decode(window), 2000, sync=False)}


def decode_batch(b: int) -> StepBatch:
    rng = random.Random(b)
    lens = [rng.randint(100, 4000) for _ in range(b)]
    tables = [rng.sample(range(50_000), -(-n // BLOCK)) for n in lens]
    width = max(map(len, tables))
    adapters = sorted(rng.randrange(8) for _ in range(b))
    starts, slots = [0], []
    for row, a in enumerate(adapters):
        if slots and slots[-1] == a:
            starts[-1] = row + 1
        else:
            slots.append(a)
            starts.append(row + 1)
    return StepBatch(input_ids=[rng.randrange(32000) for _ in range(b)], positions=[n - 1 for n in lens],
                     slots=[t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)],
                     block_tables=[t + [0] * (width - len(t)) for t in tables], context_lens=lens,
                     seg_starts=starts, seg_slots=slots)


def per_field(b: StepBatch, device) -> list[torch.Tensor]:
    """The model runner before: one tensor and one copy per field."""
    def long(v):
        return torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)

    def int32(v):
        return torch.tensor(v, dtype=torch.int32).to(device, non_blocking=True)

    return [long(b.input_ids), long(b.positions), long(b.slots), long(list(range(len(b.input_ids)))),
            int32(b.block_tables), int32(b.context_lens), int32(b.seg_starts), int32(b.seg_slots)]


def packed(b: StepBatch, device) -> dict:
    long, int32 = torch.int64, torch.int32
    return upload({"input_ids": (long, b.input_ids), "positions": (long, b.positions), "slots": (long, b.slots),
                   "block_tables": (int32, b.block_tables), "context_lens": (int32, b.context_lens),
                   "seg_starts": (int32, b.seg_starts), "seg_slots": (int32, b.seg_slots)}, device)


class OldStatic:
    """DecodeGraphs' static inputs before: one tensor per field, filled by copies (`fill` is its run's body)."""

    def __init__(self, max_batch: int, device):
        zeros = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.input_ids, self.positions = zeros(max_batch, dtype=torch.long), zeros(max_batch, dtype=torch.long)
        self.slot_mapping = zeros(max_batch, dtype=torch.long) - 1
        self.block_tables, self.context_lens = zeros(max_batch, MAX_BLOCKS), zeros(max_batch)
        self.seg_starts, self.seg_slots = zeros(max_batch + 1), zeros(max_batch) - 1

    def fill(self, t: list[torch.Tensor], bs: int) -> None:
        input_ids, positions, slots, _, block_tables, context_lens, seg_starts, seg_slots = t
        b = input_ids.shape[0]
        self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.positions[b:bs] = 0
        self.slot_mapping[:b] = slots
        self.slot_mapping[b:bs] = -1
        self.block_tables[:bs] = 0
        self.block_tables[:b, : block_tables.shape[1]] = block_tables
        self.context_lens[:b] = context_lens
        self.context_lens[b:bs] = 0
        self.seg_slots[:bs] = -1
        self.seg_starts[:bs + 1] = b
        n = seg_slots.shape[0]
        self.seg_starts[: n + 1] = seg_starts
        self.seg_slots[:n] = seg_slots


def step_inputs(device, batches=(1, 8, 64)) -> list[dict]:
    return [row for bs in batches for row in step_input_rows(device, bs)]


def step_input_rows(device, bs: int) -> list[dict]:
    sync, b = device.type == "cuda", decode_batch(bs)
    rows = [{"part": "a step's inputs to the device", "case": f"batch {bs}",
             "baseline_us": per_call_us(lambda: per_field(b, device), 200, sync),
             "lorax_us": per_call_us(lambda: packed(b, device), 200, sync)}]
    if sync:
        old, bucket = OldStatic(bs, device), Bucket(bs, MAX_BLOCKS, None, device)
        rows.append({"part": "CUDA graph inputs, filled", "case": f"batch {bs}",
                     "baseline_us": per_call_us(lambda: old.fill(per_field(b, device), bs), 200, sync),
                     "lorax_us": per_call_us(lambda: bucket.load(b), 200, sync)})
    return rows


def old_sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The sampler before (sampled rows only: no penalty, no logprobs, no greedy rows)."""
    params, dev = [s.params for s in seqs], logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params], device=dev).clamp(max=logits.shape[1])
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=dev).unsqueeze(0)
    remove = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
    remove |= (probs.cumsum(dim=-1) - probs) >= top_p
    min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    probs = torch.zeros_like(probs).scatter_(1, order, probs)
    noise = torch.empty(probs.shape, dtype=torch.float32)
    for i in range(len(seqs)):
        noise[i].exponential_()
    return (probs / noise.to(dev)).argmax(dim=-1).tolist()


SAMPLING = {"temperature 0.8": SamplingParams(temperature=0.8), "top-p 0.95": SamplingParams(top_p=0.95),
            "top-k 50": SamplingParams(temperature=0.8, top_k=50)}


def sampling(device, batches=(1, 64), cases=tuple(SAMPLING)) -> list[dict]:
    return [sampling_row(device, bs, case) for bs in batches for case in cases]


def sampling_row(device, bs: int, case: str) -> dict:
    logits = torch.randn(bs, 32000, device=device) * 3
    seqs = [Sequence([1], SAMPLING[case], None) for _ in range(bs)]
    sync, calls = device.type == "cuda", 20 if bs == 1 else 4  # the old sampler takes ~50 ms at batch 64
    return {"part": "sample a step (vocabulary 32000)", "case": f"batch {bs}, {case}",
            "baseline_us": per_call_us(lambda: old_sample(logits, seqs), calls, sync),
            "lorax_us": per_call_us(lambda: sample(logits, seqs), calls, sync)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--quick", action="store_true", help="one length and one batch (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = tokenizer(args.tokenizer)
    rows = detokenization(tok, (100,) if args.quick else (100, 500, 2000))
    rows += step_inputs(device, (8,) if args.quick else (1, 8, 64))
    rows += sampling(device, (1,), ("top-p 0.95",)) if args.quick else sampling(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [device_header(), "", f"Host microseconds per call on {device.type} (see bench/bench_host.py).", "",
             "| part | case | before (baseline) | lorax-core | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['case']} | {r['baseline_us']:.1f} | {r['lorax_us']:.1f} | "
                     f"{r['baseline_us'] / r['lorax_us']:.2f}x |")
    (out / "host.md").write_text("\n".join(lines) + "\n")
    (out / "host.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
