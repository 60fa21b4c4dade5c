"""Benchmark plumbing: GPU timing with CUDA graphs, result collection, and the tables written at the end.

Run with `pytest bench -m bench` on a machine with a GPU; tables go to $OUT (or bench/out) as markdown + JSON.
"""
import json
import math
import os
import platform
import subprocess
from datetime import date

import pytest
import torch

RESULTS: list[dict] = []
L2_FLUSH_BYTES = 256 << 20  # rotate inputs over at least this many bytes: several times a 50 MB L2


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.bench)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="benchmarks time CUDA kernels: needs a GPU"))


def copies_for(nbytes: int, minimum: int = 3, maximum: int = 64) -> int:
    """How many copies of an input to rotate so that one pass over them is larger than the L2 cache."""
    return max(minimum, min(maximum, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


def rotating(items):
    """(a function returning the next of items, round and round; how many there are): a timed call's inputs."""
    state = {"i": 0}

    def next_item():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return next_item, len(items)


def gpu_time_us(benchmark, fn, calls: int, rounds: int = 20) -> tuple[float, str]:
    """Time `calls` back-to-back calls of fn (which rotates its inputs) captured in one CUDA graph.

    Returns (median microseconds per call, "graph"), or "eager" when fn cannot be captured (then the CPU
    launch cost is included). pytest-benchmark records the replays.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
    except Exception:  # noqa: BLE001  (a baseline library that cannot be captured is timed eagerly, and labelled)
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for _ in range(calls):
                fn()

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3)
    return benchmark.stats.stats.median * 1e6 / calls, mode


def record(**row):
    RESULTS.append(row)


def device_header() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    commit = os.environ.get("LORAX_COMMIT", "")  # the GPU machine gets the tree without .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        except OSError:
            commit = ""
    commit = commit.strip()
    return f"device: {name}; torch {torch.__version__}; date {date.today()}; commit {commit or 'unknown'}"


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out, exist_ok=True)
    from bench_tables import write_tables  # noqa: PLC0415

    header = device_header()
    write_tables(RESULTS, out, header)
    with open(os.path.join(out, "bench_raw.json"), "w") as f:
        json.dump({"header": header, "rows": RESULTS}, f, indent=1)
