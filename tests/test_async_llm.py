"""AsyncLLM: the engine on its own thread, awaited from asyncio: concurrent requests give the synchronous engine's
outputs, refused requests raise without disturbing the others, leaving a stream early aborts its request."""
import asyncio
import random

import pytest

from model_helpers import ADAPTERS, save_adapters, save_model
from lorax_core import LLM, AsyncLLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync-steps", "async-steps"])
def engine(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("async")
    base = save_model(root / "base", "llama")
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=8, async_scheduling=request.param)
    for name, path in save_adapters(base, root).items():
        llm.load_adapter(name, path)
    async_llm = AsyncLLM(llm)
    yield async_llm
    async_llm.close()


def requests(n, seed=0):
    rng, names = random.Random(seed), [None, *ADAPTERS]
    return [([rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))], names[i % len(names)]) for i in range(n)]


def test_concurrent_streams_equal_the_synchronous_engine(engine):
    reqs = requests(12)
    expected = [o.token_ids for o in engine.llm.generate([p for p, _ in reqs], GREEDY, adapters=[a for _, a in reqs])]

    async def client(prompt, adapter):
        deltas = [d async for d in engine.stream(prompt, GREEDY, adapter)]
        assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
        assert deltas[-1].metrics.completion_tokens == 8 and deltas[-1].metrics.queue_time >= 0
        return [t for d in deltas for t in d.token_ids]

    async def main():
        return await asyncio.gather(*(client(p, a) for p, a in reqs))

    assert asyncio.run(main()) == expected


def test_refused_request_raises_and_the_others_complete(engine):
    async def main():
        good = asyncio.create_task(engine.generate([5, 6, 7], GREEDY, "r8_all"))
        with pytest.raises(ValueError, match="unknown adapter|not registered|nope"):
            await engine.generate([5, 6, 7], GREEDY, "nope")
        with pytest.raises(ValueError, match="empty"):
            await engine.generate([], GREEDY)
        return await good

    out = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_leaving_a_stream_early_aborts_the_request(engine):
    long = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)

    async def main():
        async def reader():
            async for delta in engine.stream([5, 6, 7], long):
                got.append(delta)

        got = []
        task = asyncio.create_task(reader())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # the engine goes idle: nothing is left running or waiting
        for _ in range(200):
            if not await engine.call(engine.llm.scheduler.has_work):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_call_runs_on_the_engine_thread_and_raises_its_errors(engine):
    async def main():
        names = await engine.call(lambda: [a.name for a in engine.llm.list_adapters()])
        with pytest.raises(ValueError):
            await engine.call(engine.llm.unload_adapter, "not-there")
        return names

    assert set(asyncio.run(main())) == set(ADAPTERS)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    runner, calls = engine.llm.runner, []
    run = runner.run

    def broken(seqs, previous=None):
        calls.append(len(seqs))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return run(seqs, previous)

    monkeypatch.setattr(runner, "run", broken)

    async def main():
        failed = await engine.generate([5, 6, 7], GREEDY, "r8_all")
        after = await engine.generate([5, 6, 7], GREEDY, "r8_all")
        return failed, after

    failed, after = asyncio.run(main())
    assert failed.finish_reason == "error" and "out of memory (simulated)" in failed.error
    assert after.finish_reason == "length" and len(after.token_ids) == 8
