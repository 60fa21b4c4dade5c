"""bench/bench_serving.py: a small CPU grid runs end to end for both systems and writes the JSON, the tables and the
plots; the transformers + PEFT baseline serves the same adapters as lorax-core (same greedy tokens)."""
import asyncio
import dataclasses
import json

from bench_helpers import load_bench_script


def test_small_cpu_grid_writes_json_tables_and_plots(tmp_path):
    bench = load_bench_script("bench_serving")
    assert bench.main(["--tiny", "--clients", "1,4", "--adapters", "1,4", "--cell-seconds", "1", "--out",
                       str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["label"].startswith("CPU run") and set(report["results"]) == {"lorax", "hf"}
    for rows in report["results"].values():
        assert sorted((r["clients"], r["adapters"]) for r in rows) == [(1, 1), (1, 4), (4, 1), (4, 4)]
        for r in rows:
            assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["completed"] >= 1
            assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["itl_ms"]["p50"] <= r["itl_ms"]["p99"]
    text = (tmp_path / "serving.md").read_text()
    assert "lorax-core / transformers + PEFT" in text and text.count("| 4 | 4 |") == 2
    for name in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_baseline_serves_the_same_adapters(tmp_path):
    """Four requests on four adapters at once: HF's left-padded mixed batch and lorax-core give the same tokens."""
    bench = load_bench_script("bench_serving")
    load = dataclasses.replace(bench.TINY, clients=(4,), setup=dataclasses.replace(bench.TINY.setup, counts=(4,),
                                                                                   concurrency=4))
    config, _, names = bench.bench_adapters.write_base_and_adapters(tmp_path, load.setup, 4, 8)
    adapters = {name: tmp_path / name for name in names}
    prompts = [[5 + i, 17, 40 + 3 * i, 9][: 2 + i] for i in range(4)]

    async def tokens(server):
        async def one(prompt, name):
            return [t async for ids in server.stream(prompt, name, 12) for t in ids]

        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, names)))

    outputs = []
    for cls in (bench.LoraxServer, bench.HFServer):
        server = cls(tmp_path / "base", adapters, load, None, config)
        try:
            outputs.append(asyncio.run(tokens(server)))
        finally:
            server.close()
    assert all(len(t) == 12 for t in outputs[0]) and outputs[0] == outputs[1]
