"""Where a decode step's time goes: torch.profiler over engine steps of a Mistral-7B-shaped model (random weights,
NF4 by default, rank-16 adapters on all projections, one adapter per request), with the host side of `LLM.step`
cut into named ranges (schedule, prepare: the step's inputs as host lists, upload: them in one copy to the device
(eager steps), forward or graph replay (which fills the graph's static inputs with one copy first), logits; the rest
of the step is sampling and bookkeeping).

Writes profile.md (per setup: the ranges, then the GPU kernels by total time; --trace: a Chrome trace of the
first setup too) under --out or $OUT. Run on a GPU machine after building: `python3 bench/profile_step.py --batch 1
--setups nf4,nf4-eager,bf16-eager,nf4-eager-base,nf4-nopdl` (one base is written for all of them; `-eager` turns
CUDA graphs off so the profiler sees each kernel, `-base` sends requests with no adapter, `-nopdl` turns programmatic
dependent launch off: with it on, a kernel starts early and waits inside, and the profiler counts the wait as its
time). `--tiny`: a CPU smoke run on a tiny
model; its numbers say nothing about a GPU. A profile, not a benchmark: the profiler adds host time per op.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_adapters as ba  # noqa: E402

RANGES = {  # (object path on the LLM, method) -> range name
    ("scheduler", "schedule"): "lorax::schedule",
    ("runner", "batch"): "lorax::prepare",
    ("runner", "upload"): "lorax::upload",
    ("runner.model", "forward"): "lorax::forward (eager)",
    ("runner.graphs", "run"): "lorax::graph replay",
    ("runner.model", "compute_logits"): "lorax::logits",
    ("", "_take"): "lorax::take tokens (waits for their step)",
}


def instrument(llm) -> None:
    """Wrap the engine's step phases in profiler ranges (instance attributes: nothing global changes)."""
    for (path, method), name in RANGES.items():
        obj = functools.reduce(getattr, path.split("."), llm) if path else llm
        if obj is None:
            continue
        inner = getattr(obj, method)

        def wrapped(*args, _inner=inner, _name=name, **kwargs):
            with torch.profiler.record_function(_name):
                return _inner(*args, **kwargs)

        setattr(obj, method, wrapped)


def build(work: Path, setup: ba.Setup, quantize: str | None, eager: bool, names: list[str], batch: int,
          overlap: bool = True):
    from lorax_core import LLM

    options = {"kv_cache_bytes": setup.kv_cache_bytes} if setup.kv_cache_bytes else {}
    llm = LLM(work / "base", dtype=setup.dtype, quantize=quantize, device=setup.device, max_num_seqs=max(batch, 1),
              cuda_graphs=not eager, async_scheduling=None if overlap else False, **options)
    for name in names:
        llm.load_adapter(name, work / name)
    return llm


def profile(llm, names: list[str], vocab: int, batch: int, steps: int, prompt: int, trace: Path | None):
    from lorax_core import SamplingParams

    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True)
    seqs = [llm.add_request([rng.randrange(3, vocab) for _ in range(prompt)], params,
                            names[i % len(names)] if names else None) for i in range(batch)]
    while any(s.first_token_time is None for s in seqs):
        llm.step()
    for _ in range(3):
        llm.step()
    instrument(llm)
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = llm.device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("lorax::step"):
                llm.step()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    for seq in seqs:
        llm.abort(seq)
    return prof, wall_ms


def tables(prof, steps: int, cuda: bool) -> str:
    events = prof.key_averages()
    ranges = [e for e in events if e.key.startswith("lorax::")]
    lines = ["| range | calls / step | host ms / step |", "|---|---|---|"]
    for e in sorted(ranges, key=lambda e: -e.cpu_time_total):
        lines.append(f"| {e.key} | {e.count / steps:.1f} | {e.cpu_time_total / 1e3 / steps:.3f} |")
    if not cuda:
        return "\n".join(lines)
    kernels = [e for e in events if getattr(e, "device_time_total", 0) > 0 and not e.key.startswith("lorax::")]
    total = sum(e.self_device_time_total for e in kernels)
    lines += ["", f"GPU time per step: {total / 1e3 / steps:.3f} ms (sum of kernel self times)", "",
              "| kernel / op | calls / step | GPU ms / step | share |", "|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]:
        lines.append(f"| {e.key[:90]} | {e.count / steps:.1f} | {e.self_device_time_total / 1e3 / steps:.3f} | "
                     f"{e.self_device_time_total / max(total, 1):.1%} |")
    return "\n".join(lines)


def parse_setup(name: str, tiny: bool) -> tuple[str | None, bool, bool, bool, bool, bool]:
    """'nf4' | 'bf16' (tiny: 'fp32'), then optional '-eager', '-base', '-nopdl', '-sync' and '-staged' ->
    (quantize, eager, base only, programmatic dependent launch, async scheduling (the engine's default), the NF4
    GEMV's loads staged in shared memory (set_nf4_gemv_staging))."""
    base_dtype, *flags = name.split("-")
    known = {"eager", "base", "nopdl", "sync", "staged"}
    if base_dtype not in ("nf4", "fp32" if tiny else "bf16") or not set(flags) <= known:
        raise SystemExit(f"unknown setup {name!r}: use nf4 or {'fp32' if tiny else 'bf16'}, then -eager, -base, "
                         "-nopdl, -sync and/or -staged")
    return (("nf4" if base_dtype == "nf4" else None), "eager" in flags, "base" in flags, "nopdl" not in flags,
            "sync" not in flags, "staged" in flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--batch", type=int, default=1, help="decode rows per step")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--setups", help="comma-separated: nf4|bf16 (tiny: fp32) [-eager] [-base] [-nopdl] [-sync] "
                                         "[-staged] (default: nf4; fp32 with --tiny)")
    parser.add_argument("--out", help="output directory (default: $OUT, else a new temporary directory)")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace of the first setup (GPU)")
    args = parser.parse_args(argv)
    from lorax_core._library import set_nf4_gemv_staging, set_programmatic_launch

    setup = ba.TINY if args.tiny else ba.GPU
    setups = [parse_setup(name, args.tiny) + (name,) for name in (args.setups or ("fp32" if args.tiny else "nf4"))
              .split(",")]
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="lorax-profile-out-"))
    out.mkdir(parents=True, exist_ok=True)
    model = "tiny Llama, float32, CPU" if args.tiny else "Mistral-7B shapes, random weights"
    sections = [ba.device_header()]
    with tempfile.TemporaryDirectory(prefix="lorax-profile-") as work:
        config, _, names = ba.write_base_and_adapters(Path(work), setup, args.adapters, args.rank)
        for i, (quantize, eager, base_only, pdl, overlap, staged, name) in enumerate(setups):
            was = set_programmatic_launch(pdl)  # read at each launch; CUDA graphs keep what they captured
            was_staged = set_nf4_gemv_staging(staged)  # the same
            llm = build(Path(work), setup, quantize, eager, names, args.batch, overlap)
            cuda, llm_async = llm.device.type == "cuda", llm.async_scheduling
            trace = out / "profile_trace.json" if cuda and args.trace and i == 0 else None
            prof, wall_ms = profile(llm, [] if base_only else names, config.vocab_size, args.batch, args.steps,
                                    8 if args.tiny else 128, trace)
            llm.close()
            del llm
            gc.collect()  # the next setup's engine sizes its KV cache by the GPU memory left free
            if cuda:
                torch.cuda.empty_cache()
            set_programmatic_launch(was)
            set_nf4_gemv_staging(was_staged)
            adapters = "no adapter" if base_only else f"{args.adapters} rank-{args.rank} adapters"
            sections.append(f"## {name}\n\n{model}, base {quantize or setup.dtype}, "
                            f"{'eager' if eager or not cuda else 'CUDA graphs'}{'' if pdl else ', PDL off'}"
                            f"{', NF4 GEMV staged' if staged else ''}"
                            f"{', async scheduling' if llm_async else ''}, "
                            f"batch {args.batch}, {adapters}; "
                            f"{args.steps} profiled decode steps, {wall_ms:.2f} ms per step under the profiler\n\n"
                            f"{tables(prof, args.steps, cuda)}")
            print(sections[-1], flush=True)
    (out / "profile.md").write_text("\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
