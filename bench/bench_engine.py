"""End-to-end engine benchmark on a Mistral-7B-shaped model with random weights (bf16 and NF4), against
transformers + PEFT (+ bitsandbytes 4-bit) generating with the same adapters in the same run.

Reports decode milliseconds per step at batch 1, 8, 32, 64 (NF4 also 2 and 4; rank-16 adapters on every
projection, chosen at random per request), decode tokens/s, and prefill tokens/s; NF4 decode at batch 1 and 8 once
more with programmatic dependent launch off (csrc/common/launch.cuh), at 1, 2, 4 and 8 once more with the NF4
fusions off (add_rms_norm, nf4_linear, sgmv and silu_mul as separate kernels instead of add_rms_norm_sgmv_shrink
at batch 1 and the GEMV's epilogue: lorax_core.model.layers.FUSED_NF4) and at 8 with them on up to 8 rows
(FUSED_NF4_MAX_ROWS, 4 by default), at 1, 2, 4 and 8 once more with the NF4 GEMV's loads staged in shared memory
(set_nf4_gemv_staging), at 1 and 8 once more with the fused projections' absmax in fp32 (as before their parts
kept their double quantization: lorax_core.model.loader.FUSED_NF4_DOUBLE_QUANT), at 1 and 4 once more with o's
LoRA shrink a kernel of its own (lorax_core.model.attention.SHRINK_O_IN_ATTENTION off), and once more with async
scheduling off (each step waits for its tokens before the host schedules the next), to measure what each gives.
Writes engine.md and engine.json under $OUT, again as each engine finishes (and prints its rows), so a run cut
short keeps what it measured. `--only nf4,nf4-staged` times some of the engines (ENGINES; hf: the baseline).
Run on a GPU machine: `python3 bench/bench_engine.py` (bench/gpu.sh does; ENGINE_ARGS passes arguments).
Wall-clock timings over many steps, after a warm-up, with torch.cuda.synchronize around each timed region.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapters import device_header  # noqa: E402  (bench/conftest.py's, loaded by path)

BATCHES, PROMPT, DECODE_STEPS, NUM_ADAPTERS, RANK = (1, 8, 32, 64), 128, 32, 8, 16
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None)


def build(work: Path):
    """Random bf16 base + NUM_ADAPTERS random rank-16 adapters, saved; returns the in-memory PEFT model too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(mistral_config(), dtype=torch.bfloat16).eval()
    model.save_pretrained(work / "base")
    lora = LoraConfig(r=RANK, lora_alpha=32, target_modules=MODULES, init_lora_weights=False)
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    peft = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, lora)
    peft.save_pretrained(work / "adapters")  # one subdirectory per adapter not named "default"
    paths = {n: work / "adapters" / n for n in names}
    return peft.eval(), paths


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def engine_rows(base: Path, adapters: dict, quantize: str | None, batches=BATCHES, prefill: bool = True,
                pdl: bool = True, fused: bool = True, fused_rows: int | None = None,
                staged: bool = False, fp32_absmax: bool = False, o_shrink_apart: bool = False) -> list[dict]:
    """fused_rows: the model's FUSED_NF4_MAX_ROWS for this engine (None: its default); staged: the NF4 GEMV's
    shared-memory main loop (set_nf4_gemv_staging); fp32_absmax: the fused projections' absmax in fp32;
    o_shrink_apart: o's LoRA shrink in a kernel of its own, not in decode attention's."""
    from lorax_core import LLM, SamplingParams
    from lorax_core._library import set_nf4_gemv_staging, set_programmatic_launch
    from lorax_core.model import attention, layers, loader

    was = set_programmatic_launch(pdl)  # read by every launch, and baked into the CUDA graphs LLM captures
    was_staged = set_nf4_gemv_staging(staged)  # the same
    default_rows = layers.FUSED_NF4_MAX_ROWS
    layers.FUSED_NF4 = fused  # both read as the graphs are captured
    layers.FUSED_NF4_MAX_ROWS = default_rows if fused_rows is None else fused_rows
    attention.SHRINK_O_IN_ATTENTION = not o_shrink_apart  # the same
    impl = "lorax" if pdl else "lorax, PDL off"
    impl += "" if fused else ", NF4 fusions off"
    impl += "" if fused_rows is None else f", NF4 fusions up to {fused_rows} rows"
    impl += ", GEMV staged" if staged else ""
    impl += ", fused absmax fp32" if fp32_absmax else ""
    impl += ", o's shrink apart" if o_shrink_apart else ""
    loader.FUSED_NF4_DOUBLE_QUANT = not fp32_absmax  # read as the model loads
    llm = LLM(base, dtype="bfloat16", quantize=quantize, device="cuda", max_num_seqs=max(BATCHES))
    loader.FUSED_NF4_DOUBLE_QUANT = True
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    rng, names, rows = random.Random(0), list(adapters), []
    params = SamplingParams(max_tokens=DECODE_STEPS + 8, temperature=0, ignore_eos=True)
    # every adapter into memory first: a batch whose adapters still load decodes its first requests meanwhile,
    # which could use up their max_tokens before the timed steps
    llm.generate([[3] * 8] * len(names), SamplingParams(max_tokens=1), adapters=names)
    # the default engine also decodes batches 1 and 8 with async scheduling off (the same LLM: it is a flag read
    # by each step), to measure what overlapping the host with the device gives
    modes = [(batch, True) for batch in batches]
    if pdl and fused:
        modes += [(batch, False) for batch in batches if batch in (1, 8)]
    for batch, overlap in modes:
        llm.async_scheduling = overlap
        seqs = [llm.add_request([rng.randrange(3, 32000) for _ in range(PROMPT)], params, rng.choice(names))
                for _ in range(batch)]
        while any(seq.first_token_time is None for seq in seqs):
            llm.step()  # prefill (adapters load in the background: some requests may start a step or more later)
        for _ in range(3):
            llm.step()  # warm-up decode steps
        seconds = timed(lambda: [llm.step() for _ in range(DECODE_STEPS)]) / DECODE_STEPS
        for seq in seqs:
            llm.abort(seq)
        rows.append(dict(impl=impl if overlap else impl + ", async scheduling off", quant=quantize or "bf16",
                         batch=batch, ms=seconds * 1e3, tokens_per_s=batch / seconds))
    llm.async_scheduling = True
    if prefill:
        rows.append(prefill_row(llm, names, rng, params, impl, quantize))
    del llm
    torch.cuda.empty_cache()
    set_programmatic_launch(was)
    set_nf4_gemv_staging(was_staged)
    layers.FUSED_NF4, layers.FUSED_NF4_MAX_ROWS = True, default_rows
    attention.SHRINK_O_IN_ATTENTION = True
    return rows


def prefill_row(llm, names: list[str], rng: random.Random, params, impl: str, quantize: str | None) -> dict:
    seqs = [llm.add_request([rng.randrange(3, 32000) for _ in range(512)], params, rng.choice(names)) for _ in range(8)]
    prefill = timed(llm.step)
    for seq in seqs:
        llm.abort(seq)
    return dict(impl=impl, quant=quantize or "bf16", batch="prefill 8x512", ms=prefill * 1e3,
                tokens_per_s=8 * 512 / prefill)


def hf_rows(model, names: list[str], quant: str) -> list[dict]:
    rng, rows = random.Random(0), []
    for batch in BATCHES[:3]:
        ids = torch.randint(3, 32000, (batch, PROMPT), device="cuda")
        which = [rng.choice(names) for _ in range(batch)]

        def generate(n):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=which,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False)

        generate(2)
        seconds = (timed(lambda: generate(DECODE_STEPS + 1)) - timed(lambda: generate(1))) / DECODE_STEPS
        rows.append(dict(impl="hf+peft", quant=quant, batch=batch, ms=seconds * 1e3, tokens_per_s=batch / seconds))
    return rows


def table(rows: list[dict]) -> str:
    hf = {(r["quant"], r["batch"]): r for r in rows if r["impl"] == "hf+peft"}
    lines = ["| engine | weights | batch | ms / step | tokens/s | vs HF+PEFT |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = hf.get((r["quant"], r["batch"])) if r["impl"] != "hf+peft" else None
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else "-"
        lines.append(f"| {r['impl']} | {r['quant']} | {r['batch']} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


# The engines timed, by name (`--only` picks some): (quantize, engine_rows' keyword arguments). "hf" is the baseline,
# transformers + PEFT in bf16 and with bitsandbytes 4-bit.
ENGINES = {
    "bf16": (None, {}),
    "nf4": ("nf4", {"batches": (1, 2, 4) + BATCHES[1:]}),
    "nf4-pdl-off": ("nf4", {"batches": (1, 8), "prefill": False, "pdl": False}),
    # where the fused NF4 ops stop paying (lorax_core.model.layers.FUSED_NF4_MAX_ROWS): off, and up to 8 rows
    "nf4-fusions-off": ("nf4", {"batches": (1, 2, 4, 8), "prefill": False, "fused": False}),
    "nf4-fused-8-rows": ("nf4", {"batches": (8,), "prefill": False, "fused_rows": 8}),
    # the GEMV's other main loop: its loads staged in shared memory instead of registers
    "nf4-staged": ("nf4", {"batches": (1, 2, 4, 8), "prefill": False, "staged": True}),
    # the fused projections' absmax as they had it before: fp32, not their parts' 8-bit codes
    "nf4-fp32-absmax": ("nf4", {"batches": (1, 8), "prefill": False, "fp32_absmax": True}),
    # o's LoRA shrink as its own kernel, as before decode attention did it
    "nf4-o-shrink-apart": ("nf4", {"batches": (1, 4), "prefill": False, "o_shrink_apart": True}),
}


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated engines to time, of: hf, " + ", ".join(ENGINES)
                        + " (default: all). The device tool allows 10 minutes a call: split the list over calls")
    args = parser.parse_args(argv)
    known = ["hf", *ENGINES]
    args.only = [n for n in args.only.split(",") if n] or known
    unknown = [n for n in args.only if n not in known]
    if unknown:
        parser.error(f"unknown engines {unknown}; known: {', '.join(known)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lorax-bench-"))
    peft, adapters = build(work)
    header, rows = device_header(), []

    def add(new: list[dict]) -> None:  # each engine's rows are written (and printed) as it finishes
        rows.extend(new)
        text = f"{header}\n\nMistral-7B shapes, random weights, {NUM_ADAPTERS} rank-{RANK} adapters on all " \
               f"projections, random per request, prompts of {PROMPT} tokens, {DECODE_STEPS} timed decode steps\n\n" \
               f"{table(rows)}\n"
        (out / "engine.md").write_text(text)
        (out / "engine.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        print(table(new), flush=True)

    if "hf" in args.only:
        add(hf_rows(peft, list(adapters), "bf16"))
    del peft
    torch.cuda.empty_cache()
    for name, (quantize, kwargs) in ENGINES.items():
        if name in args.only:
            add(engine_rows(work / "base", adapters, quantize, **kwargs))
    if "hf" in args.only:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=bnb, device_map="cuda")
        names = list(adapters)
        hf = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            hf.load_adapter(adapters[name], adapter_name=name)
        add(hf_rows(hf.eval(), names, "nf4"))
    print((out / "engine.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
