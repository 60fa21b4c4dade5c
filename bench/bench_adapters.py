"""Serving benchmark: throughput and time to first token with 1, 8, 32 and 128 distinct adapters, drawn at random
per request, at a fixed concurrency on one engine. Target on an H100: 128 adapters >= 90% of one adapter's tokens/s.

Mistral-7B shapes, random weights, base quantized to NF4 (LoRA Land serves 4-bit QLoRA bases; `--quantize none`:
bf16). 128 random rank-8 adapters on all seven projections are written directly as PEFT adapter directories and all
registered. For each n a closed loop keeps C = 32 requests in flight (each finished one replaced at once) until
R = 256 have completed; a request has a random prompt of 128..512 tokens (the same sequence for every n), generates
64 tokens (ignore_eos) and names an adapter drawn uniformly from the first n. tokens/s: tokens generated from the
first submission to the R-th completion over that wall time (requests then in flight are aborted, their tokens so
far count). TTFT: first token minus arrival of the completed requests. Device loads / evictions: change of the
adapters' counters over the run.

A warm-up first sends one request to every adapter, so all 128 are in host memory (the host cache holds them all):
disk -> host loading is not timed. Host -> device pool exchange (the pool holds about 1.25 C adapters) is timed:
it is the cost of serving many adapters.

`python3 bench/bench_adapters.py [--quantize nf4|none] [--out DIR]` on a GPU (bench/gpu.sh runs it); `--tiny`: a CPU
smoke run (tiny Llama, float32, 16 adapters, n = 1, 4, 16, C = 4). Writes adapters.md and adapters.json to --out,
else $OUT, else a new temporary directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None)
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Setup:
    device: str
    dtype: torch.dtype
    counts: tuple[int, ...]  # distinct adapters per run; the last is how many are registered
    concurrency: int
    requests: int  # completed requests per run
    prompt: tuple[int, int]  # prompt length range (tokens)
    max_tokens: int
    rank: int = 8
    kv_cache_bytes: int | None = None  # None: the engine's default


GPU = Setup("cuda", torch.bfloat16, (1, 8, 32, 128), 32, 256, (128, 512), 64)
TINY = Setup("cpu", torch.float32, (1, 4, 16), 4, 16, (4, 16), 4, kv_cache_bytes=2**22)


def save_base(path: Path, setup: Setup):
    """Random base weights saved with save_pretrained (built on the benchmark's device; on a CPU the tiny test
    Llama); returns its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

    if setup.device == "cpu":
        sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
        from model_helpers import save_model

        save_model(path, tokenizer=False)
    else:
        torch.manual_seed(0)
        with torch.device(setup.device):
            model = AutoModelForCausalLM.from_config(MistralConfig(**MISTRAL_7B), dtype=setup.dtype)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return AutoConfig.from_pretrained(path)


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) of each projection."""
    h, i = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    return dict(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv), o_proj=(q, h), gate_proj=(h, i), up_proj=(h, i),
                down_proj=(i, h))


def write_adapter(path: Path, shapes: dict, layers: int, rank: int, dtype: torch.dtype, seed: int,
                  device: str = "cpu") -> Path:
    """A PEFT LoRA adapter directory with random A [r, in] and B [out, r] (std 0.01), written without PEFT."""
    gen = torch.Generator(device).manual_seed(seed)
    randn = lambda *shape: (torch.randn(*shape, generator=gen, device=device) * 0.01).to(dtype).cpu()  # noqa: E731
    tensors = {}
    for layer, (module, (n_in, n_out)) in itertools.product(range(layers), shapes.items()):
        prefix = f"base_model.model.model.layers.{layer}.{'mlp' if module in MLP else 'self_attn'}.{module}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = randn(rank, n_in), randn(n_out, rank)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=16, lora_dropout=0.0, bias="none",
                  target_modules=list(shapes))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path


def write_base_and_adapters(work: Path, setup: Setup, count: int, rank: int):
    """The random base (work/base) and `count` random rank-`rank` adapters a0, a1, ... beside it; returns the
    base's config, its projection shapes and the adapter names."""
    config = save_base(work / "base", setup)
    shapes, names = module_shapes(config), [f"a{i}" for i in range(count)]
    for i, name in enumerate(names):
        write_adapter(work / name, shapes, config.num_hidden_layers, rank, setup.dtype, seed=i, device=setup.device)
    return config, shapes, names


def engine_options(setup: Setup, shapes: dict, layers: int, page: int) -> dict:
    """Pool room for 1.25 x concurrency adapters, host cache for all of them (sizes as the pool lays them out:
    each rank row of A and of B^T in whole pages, plus a page table per adapter in host memory)."""
    from lorax_core import EngineConfig
    from lorax_core.adapters import pages_for

    pages = pages_for(shapes, {(layer, m): setup.rank for layer in range(layers) for m in shapes}, page)
    device_bytes = pages * page * torch.empty(0, dtype=setup.dtype).element_size()
    chunks = math.ceil(max(max(dims) for dims in shapes.values()) / page)
    table_bytes = layers * len(shapes) * (2 * EngineConfig().max_lora_rank * chunks + 1) * 4
    options = dict(max_num_seqs=setup.concurrency, max_active_adapters=2 * setup.concurrency, adapter_page_size=page,
                   adapter_pool_bytes=int(1.25 * setup.concurrency * device_bytes),
                   host_adapter_cache_bytes=int(1.25 * setup.counts[-1] * (device_bytes + table_bytes)))
    return options | ({"kv_cache_bytes": setup.kv_cache_bytes} if setup.kv_cache_bytes else {})


def random_prompt(rng: random.Random, setup: Setup, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(rng.randint(*setup.prompt))]


def closed_loop(llm, setup: Setup, pick) -> tuple[list, int, float]:
    """Keep `concurrency` requests in flight until `requests` have completed; returns (completed, tokens, seconds)."""
    from lorax_core import SamplingParams

    rng, vocab = random.Random(0), llm.model.config.vocab_size
    params = SamplingParams(max_tokens=setup.max_tokens, temperature=0, ignore_eos=True)
    submit = lambda: llm.add_request(random_prompt(rng, setup, vocab), params, adapter=pick())  # noqa: E731
    start = time.monotonic()
    flight = [submit() for _ in range(setup.concurrency)]
    submitted, done = list(flight), []
    while len(done) < setup.requests:
        llm.step()
        for seq in [s for s in flight if s.finished]:
            if seq.finish_reason != "length":
                raise RuntimeError(f"request {seq.id} ended with {seq.finish_reason}: {seq.error}")
            flight.remove(seq)
            done.append(seq)
            if len(done) < setup.requests:
                flight.append(submit())
                submitted.append(flight[-1])
    seconds = time.monotonic() - start
    for seq in flight:
        llm.abort(seq)
    return done, sum(s.num_completion_tokens for s in submitted), seconds


def counters(llm) -> dict:
    stats = [a.stats for a in llm.list_adapters()]
    return {k: sum(getattr(s, k) for s in stats) for k in ("host_loads", "device_loads", "evictions")}


def measure(llm, setup: Setup, names: list[str], n: int) -> dict:
    before, rng = counters(llm), random.Random(n)
    done, tokens, seconds = closed_loop(llm, setup, lambda: rng.choice(names[:n]))
    after = counters(llm)
    ttft = sorted((s.first_token_time - s.arrival_time) * 1e3 for s in done)
    return dict(adapters=n, requests=len(done), seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                requests_per_s=len(done) / seconds, ttft_mean_ms=statistics.fmean(ttft),
                ttft_p50_ms=statistics.median(ttft), ttft_p90_ms=ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
                **{k: after[k] - before[k] for k in after})


def run(work: Path, setup: Setup, quantize: str | None) -> tuple[list[dict], dict]:
    from lorax_core import LLM, SamplingParams

    config, shapes, names = write_base_and_adapters(work, setup, setup.counts[-1], setup.rank)
    options = engine_options(setup, shapes, config.num_hidden_layers,
                             page=min(1024, 1 << (config.hidden_size - 1).bit_length()))
    llm = LLM(work / "base", dtype=setup.dtype, quantize=quantize, device=setup.device, **options)
    for name in names:
        llm.load_adapter(name, work / name)
    rng, warm = random.Random(-1), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    # warm-up, untimed: one request per adapter, so every adapter is read from disk into host memory now
    llm.generate([random_prompt(rng, setup, config.vocab_size) for _ in names], warm, adapters=names)
    rows = [measure(llm, setup, names, n) for n in setup.counts]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows, options


def device_header() -> str:
    """bench/conftest.py's device line (loaded by path: under pytest, `conftest` is tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location("bench_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.device_header()


def table(rows: list[dict]) -> str:
    lines = ["| adapters | requests | tokens/s | vs 1 adapter | requests/s | TTFT mean / p50 / p90 ms | device loads | "
             + "evictions |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['adapters']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} | "
                     f"{r['requests_per_s']:.1f} | {r['ttft_mean_ms']:.0f} / {r['ttft_p50_ms']:.0f} / "
                     f"{r['ttft_p90_ms']:.0f} | {r['device_loads']} | {r['evictions']} |")
    return "\n".join(lines)


def write(out: Path, setup: Setup, quantize: str, rows: list[dict], options: dict) -> str:
    model = "tiny Llama (hidden 64, 2 layers), float32" if setup.device == "cpu" else "Mistral-7B shapes"
    config = (f"{model}, random weights, base {quantize}; {setup.counts[-1]} rank-{setup.rank} adapters on all 7 "
              f"projections, drawn at random per request from the first n; closed loop at concurrency "
              f"{setup.concurrency} until {setup.requests} requests completed, prompts of {setup.prompt[0]}.."
              f"{setup.prompt[1]} tokens, {setup.max_tokens} generated tokens each; engine options {options}")
    header = device_header()
    text = f"{header}\n\n{config}\n\n{table(rows)}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.md").write_text(text)
    described = {**dataclasses.asdict(setup), "dtype": str(setup.dtype), "quantize": quantize}
    (out / "adapters.json").write_text(json.dumps(dict(header=header, config=config, setup=described,
                                                       engine_options=options, rows=rows), indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--quantize", choices=["nf4", "none"], help="base weights (default: nf4; none with --tiny)")
    parser.add_argument("--out", help="output directory (default: $OUT, else a new temporary directory)")
    args = parser.parse_args(argv)
    setup = TINY if args.tiny else GPU
    quantize = args.quantize or ("none" if args.tiny else "nf4")
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="lorax-adapters-out-"))
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: one thread is fastest and does not stall when the other core is busy
    try:
        with tempfile.TemporaryDirectory(prefix="lorax-adapters-") as work:
            rows, options = run(Path(work), setup, None if quantize == "none" else quantize)
    finally:
        torch.set_num_threads(threads)
    print(write(out, setup, quantize, rows, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
