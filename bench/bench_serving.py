"""Serving benchmark: the LoRAX load test of the LoRA Land report, on lorax-core and on transformers + PEFT.

N concurrent clients (1, 8, 32, 64) each run a closed loop: send a request, read its tokens as they stream, send the
next. A request has a prompt of 90..110 random tokens, asks for 100 new tokens (greedy, ignore_eos) and names an
adapter drawn at random among K (1, 8, 32, 128) rank-8 adapters on all seven projections. Every (N, K) cell runs
until max(2N, 8) requests have completed or 10 s have passed, whichever is first; then the clients are cancelled
(their requests aborted) and the server drains before the next cell.

Measured on the client side, as a user of the server sees it: throughput = tokens received by all clients / the
cell's wall time; TTFT = request sent to its first token; ITL = the gap between two successive tokens of one
request. p50 / p90 / p99 over every request (TTFT) and every gap (ITL) of the cell.

The two systems, measured one after the other in the same run, on the same base weights, adapters and prompts:
- lorax-core: AsyncLLM (the engine on its own thread, continuous batching of mixed adapters with SGMV/BGMV).
  Before the grid one short request per adapter reads every adapter into host memory (untimed).
- transformers + PEFT, the baseline: one PeftModel holding all K adapters, serving mixed-adapter batches with
  `generate(..., adapter_names=...)`. Static batching, as that API allows: the worker takes every waiting request
  (up to N), left-pads them into one batch and generates until all have 100 tokens, streaming each step's tokens; a
  request that arrives meanwhile waits for the next batch.

`python3 bench/bench_serving.py [--quantize nf4|none] [--out DIR]` on a GPU (Mistral-7B shapes, random weights, base
in NF4 by default: transformers loads it with bitsandbytes); `--tiny`: a CPU run of the tiny test Llama in float32
with 16-token prompts and 16 new tokens (labelled so: it says nothing about GPU serving). `--plot FILE.json`
redraws the plots of an earlier run (for a GPU machine without matplotlib). Writes serving.json (every cell's raw
numbers), serving.md (the tables) and, with matplotlib, serving_throughput.png and serving_latency.png to --out,
else $OUT, else a new temporary directory.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapters  # noqa: E402  (base and adapter writing, engine sizing, device header)


@dataclasses.dataclass(frozen=True)
class Load:
    setup: bench_adapters.Setup  # model, dtype, device, prompt range, max_tokens; counts = K values, concurrency = max N
    clients: tuple[int, ...]
    cell_seconds: float
    min_requests: int = 8  # a cell ends after max(2N, min_requests) completed requests (or cell_seconds)
    label: str = ""

    @property
    def adapters(self) -> tuple[int, ...]:
        return self.setup.counts

    @property
    def prompt(self) -> tuple[int, int]:
        return self.setup.prompt

    @property
    def max_tokens(self) -> int:
        return self.setup.max_tokens


GPU = Load(bench_adapters.Setup("cuda", torch.bfloat16, (1, 8, 32, 128), 64, 0, (90, 110), 100),
           clients=(1, 8, 32, 64), cell_seconds=10.0,
           label="Mistral-7B shapes, random weights, bfloat16 activations")
TINY = Load(bench_adapters.Setup("cpu", torch.float32, (1, 8, 32, 128), 64, 0, (12, 20), 16, kv_cache_bytes=2**24),
            clients=(1, 8, 32, 64), cell_seconds=3.0,
            min_requests=32, label="CPU run of the tiny test Llama (hidden 64, 2 layers, float32): not a GPU result")
SYSTEMS = ("lorax", "hf")
SYSTEM_NAMES = {"lorax": "lorax-core", "hf": "transformers + PEFT"}


# --- the two servers, behind one streaming interface ----------------------------------------------------------
class LoraxServer:
    """lorax-core's AsyncLLM; stream() yields the token ids of each delta."""

    def __init__(self, base: Path, adapters: dict[str, Path], load: Load, quantize: str | None, config):
        from lorax_core import LLM, AsyncLLM

        setup, page = load.setup, min(1024, 1 << (config.hidden_size - 1).bit_length())
        options = bench_adapters.engine_options(setup, bench_adapters.module_shapes(config), config.num_hidden_layers,
                                                page)
        llm = LLM(base, dtype=setup.dtype, quantize=quantize, device=setup.device, **options)
        for name, path in adapters.items():
            llm.load_adapter(name, path)
        self.engine = AsyncLLM(llm)

    async def warm_up(self, prompts: list[list[int]], names: list[str]) -> None:
        from lorax_core import SamplingParams

        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        await asyncio.gather(*(self.engine.generate(p, params, n) for p, n in zip(prompts, names)))

    async def stream(self, prompt: list[int], adapter: str, max_tokens: int) -> AsyncIterator[list[int]]:
        from lorax_core import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async with contextlib.aclosing(self.engine.stream(prompt, params, adapter)) as deltas:
            async for delta in deltas:
                if delta.finish_reason not in (None, "length"):
                    raise RuntimeError(f"request ended with {delta.finish_reason}: {delta.error}")
                if delta.token_ids:
                    yield delta.token_ids

    async def drain(self) -> None:
        while await self.engine.call(self.engine.llm.scheduler.has_work):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.engine.close()
        self.engine.llm.close()


@dataclasses.dataclass(eq=False)
class _HFRequest:
    prompt: list[int]
    adapter: str
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)  # [token id] per step, None at the end
    cancelled: bool = False

    def put(self, item: list[int] | None) -> None:
        with contextlib.suppress(RuntimeError):  # the client's loop is gone
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class HFServer:
    """transformers + PEFT, all adapters in one PeftModel, static mixed-adapter batches on a worker thread."""

    def __init__(self, base: Path, adapters: dict[str, Path], load: Load, quantize: str | None, config=None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        setup = load.setup
        quant = None
        if quantize == "nf4":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=setup.dtype)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=setup.dtype, quantization_config=quant,
                                                     device_map=setup.device)
        names = list(adapters)
        # autocast_adapter_dtype=False: keep the adapters in the model's dtype (PEFT would upcast them to float32)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0],
                                          autocast_adapter_dtype=False)
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name, autocast_adapter_dtype=False)
        self.model = model.eval()
        self.device, self.max_batch = torch.device(setup.device), max(load.clients)
        self.pending: queue.Queue[_HFRequest | None] = queue.Queue()
        self.outstanding, self.lock = 0, threading.Lock()  # requests queued or in a batch
        self.worker = threading.Thread(target=self._run, name="hf-server", daemon=True)
        self.worker.start()

    async def warm_up(self, prompts: list[list[int]], names: list[str]) -> None:
        for p, n in list(zip(prompts, names))[:2]:  # the adapters are in device memory already: warm the kernels
            async for _ in self.stream(p, n, 2):
                pass

    async def stream(self, prompt: list[int], adapter: str, max_tokens: int) -> AsyncIterator[list[int]]:
        request = _HFRequest(prompt, adapter, max_tokens, asyncio.get_running_loop())
        with self.lock:
            self.outstanding += 1
        self.pending.put(request)
        try:
            while (ids := await request.tokens.get()) is not None:
                yield ids
        finally:
            request.cancelled = True  # the worker drops it, or stops its batch once all of that batch are cancelled

    async def drain(self) -> None:
        while self.outstanding:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.pending.put(None)
        self.worker.join()

    def _run(self) -> None:
        while (first := self.pending.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    request = self.pending.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    self.pending.put(None)
                    break
                batch.append(request)
            live = [r for r in batch if not r.cancelled]
            if live:
                self._generate(live)
            for r in live:
                r.put(None)
            with self.lock:
                self.outstanding -= len(batch)

    def _generate(self, batch: list[_HFRequest]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, tokens):
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for r, token in zip(batch, tokens.tolist()):
                    r.put([token])

            def end(self):
                pass

        class AllCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), all(r.cancelled for r in batch), dtype=torch.bool,
                                  device=input_ids.device)

        tokens = max(r.max_tokens for r in batch)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                adapter_names=[r.adapter for r in batch], max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=False, pad_token_id=0, streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([AllCancelled()]))


# --- the load ------------------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values) * 1e3, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


async def run_cell(server, load: Load, names: list[str], vocab: int, clients: int, adapters: int, seed: int
                   ) -> dict:
    """Closed-loop clients against one server until the cell's request count or time is reached."""
    rng = random.Random(seed)
    target = max(2 * clients, load.min_requests)
    ttft, itl, received, completed = [], [], [0], [0]
    enough = asyncio.Event()

    async def client():
        while True:
            prompt = bench_adapters.random_prompt(rng, load.setup, vocab)
            adapter = rng.choice(names[:adapters])
            sent = last = time.perf_counter()
            count = 0
            async for ids in server.stream(prompt, adapter, load.max_tokens):
                now, n = time.perf_counter(), len(ids)
                if count == 0:
                    ttft.append(now - sent)
                else:
                    itl.extend([(now - last) / n] * n)
                last, count = now, count + n
                received[0] += n
            completed[0] += count == load.max_tokens
            if completed[0] >= target:
                enough.set()

    start = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), load.cell_seconds)
    seconds = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if errors:
        raise errors[0]
    await server.drain()
    return dict(clients=clients, adapters=adapters, seconds=seconds, completed=completed[0], tokens=received[0],
                tokens_per_s=received[0] / seconds, ttft_ms=percentiles(ttft), itl_ms=percentiles(itl))


async def run_system(server, load: Load, names: list[str], vocab: int, log) -> list[dict]:
    rng = random.Random(-1)
    warm = [bench_adapters.random_prompt(rng, load.setup, vocab) for _ in names]
    await server.warm_up(warm, names)
    rows = []
    for k in load.adapters:
        for n in load.clients:
            row = await run_cell(server, load, names, vocab, n, k, seed=1000 * k + n)
            log(f"  K={k:4d} N={n:3d}: {row['tokens_per_s']:9.1f} tok/s, TTFT p50 {_fmt(row['ttft_ms']['p50'])} ms, "
                f"ITL p50 {_fmt(row['itl_ms']['p50'])} ms, {row['completed']} completed in {row['seconds']:.1f} s")
            rows.append(row)
    return rows


def run(work: Path, load: Load, quantize: str | None, systems: tuple[str, ...], log=print) -> dict:
    setup = load.setup
    config, _, names = bench_adapters.write_base_and_adapters(work, setup, max(load.adapters), setup.rank)
    adapters = {name: work / name for name in names}
    results = {}
    for system in systems:
        log(f"{SYSTEM_NAMES[system]}:")
        started = time.perf_counter()
        server = (LoraxServer if system == "lorax" else HFServer)(work / "base", adapters, load, quantize, config)
        log(f"  ready in {time.perf_counter() - started:.1f} s")
        try:
            results[system] = asyncio.run(run_system(server, load, names, config.vocab_size, log))
        finally:
            server.close()
            del server
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


# --- the report ----------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(report: dict) -> str:
    results, lines = report["results"], []
    systems = list(results)
    lines.append("Throughput (generated tokens/s, all clients together" +
                 ("; each cell: lorax-core / transformers + PEFT (ratio))" if len(systems) == 2 else ")"))
    lines.append("")
    lines.append("| K adapters | " + " | ".join(f"N = {n}" for n in report["clients"]) + " |")
    lines.append("|---|" + "---|" * len(report["clients"]))
    for k in report["adapters"]:
        cells = []
        for n in report["clients"]:
            rows = {s: next(r for r in results[s] if r["clients"] == n and r["adapters"] == k) for s in systems}
            values = [f"{rows[s]['tokens_per_s']:.0f}" for s in systems]
            ratio = (f" ({rows['lorax']['tokens_per_s'] / rows['hf']['tokens_per_s']:.1f}x)"
                     if len(systems) == 2 and rows["hf"]["tokens_per_s"] else "")
            cells.append(" / ".join(values) + ratio)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for system in systems:
        lines += ["", f"Latency, {SYSTEM_NAMES[system]} (ms; TTFT and ITL p50 / p90 / p99)", "",
                  "| K | N | tokens/s | completed | TTFT p50 / p90 / p99 | ITL p50 / p90 / p99 |",
                  "|---|---|---|---|---|---|"]
        for r in results[system]:
            t, i = r["ttft_ms"], r["itl_ms"]
            lines.append(f"| {r['adapters']} | {r['clients']} | {r['tokens_per_s']:.0f} | {r['completed']} | "
                         f"{_fmt(t['p50'], 0)} / {_fmt(t['p90'], 0)} / {_fmt(t['p99'], 0)} | "
                         f"{_fmt(i['p50'])} / {_fmt(i['p90'])} / {_fmt(i['p99'])} |")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    """serving_throughput.png (tokens/s vs K, a line per N and system) and serving_latency.png (TTFT and ITL p50
    vs N at the largest K); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    results, styles = report["results"], {"lorax": "-", "hf": "--"}
    title = f"{report['label']}\n{report['header'].splitlines()[0]}"
    colors = {n: f"C{i}" for i, n in enumerate(report["clients"])}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, rows in results.items():
        for n in report["clients"]:
            points = sorted((r["adapters"], r["tokens_per_s"]) for r in rows if r["clients"] == n)
            ax.plot(*zip(*points), styles[system], color=colors[n], marker="o",
                    label=f"{SYSTEM_NAMES[system]}, N = {n}")
    ax.set(xscale="log", yscale="log", xlabel="distinct adapters K", ylabel="throughput (tokens/s)")
    ax.set_title(f"Throughput vs adapters (N concurrent clients)\n{title}", fontsize=8)
    ax.set_xticks(report["adapters"], [str(k) for k in report["adapters"]])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out / "serving_throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    k = max(report["adapters"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, metric, name in zip(axes, ("ttft_ms", "itl_ms"), ("time to first token", "inter-token latency")):
        for color, (system, rows) in enumerate(results.items()):
            points = sorted((r["clients"], r[metric]["p50"], r[metric]["p90"]) for r in rows
                            if r["adapters"] == k and r[metric]["p50"] is not None)
            if points:
                n, p50, p90 = zip(*points)
                ax.plot(n, p50, styles[system], color=f"C{color}", marker="o", label=f"{SYSTEM_NAMES[system]} p50")
                ax.plot(n, p90, styles[system], color=f"C{color}", marker="x", alpha=0.4,
                        label=f"{SYSTEM_NAMES[system]} p90")
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients N", ylabel=f"{name} (ms)",
               title=f"{name}, K = {k} adapters")
        ax.set_xticks(report["clients"], [str(n) for n in report["clients"]])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    paths.append(out / "serving_latency.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write(out: Path, report: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=1))
    text = f"{report['header']}\n\n{report['config']}\n\n{tables(report)}\n"
    (out / "serving.md").write_text(text)
    plot(report, out)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU run of the tiny test model (labelled as such)")
    parser.add_argument("--quantize", choices=["nf4", "none"], help="base weights (default: nf4; none with --tiny)")
    parser.add_argument("--systems", default="lorax,hf", help="comma list of lorax, hf (default: both)")
    parser.add_argument("--clients", help="comma list of N (default: 1,8,32,64)")
    parser.add_argument("--adapters", help="comma list of K (default: 1,8,32,128)")
    parser.add_argument("--cell-seconds", type=float, help="time limit of one (N, K) cell")
    parser.add_argument("--out", help="output directory (default: $OUT, else a new temporary directory)")
    parser.add_argument("--plot", metavar="JSON", help="only redraw the plots of an earlier serving.json")
    args = parser.parse_args(argv)
    if args.plot:
        report = json.loads(Path(args.plot).read_text())
        print("\n".join(str(p) for p in plot(report, Path(args.out or Path(args.plot).parent))))
        return 0
    load = TINY if args.tiny else GPU
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    if args.adapters:
        load = dataclasses.replace(load, setup=dataclasses.replace(load.setup, counts=ints(args.adapters)))
    if args.clients:
        clients = ints(args.clients)
        load = dataclasses.replace(load, clients=clients, setup=dataclasses.replace(load.setup,
                                                                                    concurrency=max(clients)))
    if args.cell_seconds:
        load = dataclasses.replace(load, cell_seconds=args.cell_seconds)
    systems = tuple(args.systems.split(","))
    if not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}")
    quantize = args.quantize or ("none" if args.tiny else "nf4")
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="lorax-serving-out-"))
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: one thread is fastest and leaves the other core to the clients
    try:
        with tempfile.TemporaryDirectory(prefix="lorax-serving-") as work:
            results = run(Path(work), load, None if quantize == "none" else quantize, systems)
    finally:
        torch.set_num_threads(threads)
    config = (f"{load.label}; base {quantize}; K random rank-{load.setup.rank} adapters on all 7 projections, one "
              f"drawn at random per request; N closed-loop clients; prompts of {load.prompt[0]}..{load.prompt[1]} "
              f"random tokens, {load.max_tokens} new tokens each (greedy, ignore_eos); a cell ends after max(2N, "
              f"{load.min_requests}) completed requests or {load.cell_seconds:g} s; measured at the clients")
    report = dict(header=bench_adapters.device_header(), label=load.label, config=config, quantize=quantize,
                  clients=list(load.clients), adapters=list(load.adapters), prompt=list(load.prompt),
                  max_tokens=load.max_tokens, cell_seconds=load.cell_seconds, results=results)
    print(write(out, report))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
