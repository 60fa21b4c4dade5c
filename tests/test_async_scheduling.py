"""Async scheduling (LLM.step launches a step before the host has the previous step's tokens; the inputs for those
tokens are gathered from the previous step's tokens on the device): the same outputs as the synchronous engine, one
step later, with a dropped row only for a sequence that stops on a token it could not foresee."""
import random

import pytest
import torch

from model_helpers import MIXED_ROWS, save_adapters, save_model
from lorax_core import LLM, SamplingParams
from lorax_core.engine.sequence import Sequence


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_sched")
    base = save_model(root / "base", "llama")
    return base, save_adapters(base, root)


def engine(paths, async_scheduling, **options):
    base, adapters = paths
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=16, adapter_loader_threads=0,
              async_scheduling=async_scheduling, **options)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm


@pytest.fixture(scope="module")
def engines(paths):
    return {mode: engine(paths, mode) for mode in (False, True)}


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def rows_per_step(llm, monkeypatch) -> list[int]:
    """Record the number of rows of each step the engine launches."""
    rows, run = [], llm.runner.run
    monkeypatch.setattr(llm.runner, "run", lambda seqs, previous=None: rows.append(len(seqs)) or run(seqs, previous))
    return rows


def test_defaults():
    from lorax_core.engine.config import EngineConfig

    assert EngineConfig().async_scheduling is None  # LLM: on for a GPU, off on the CPU
    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        EngineConfig(async_scheduling="yes")


def test_outputs_equal_the_synchronous_engine(engines):
    """Greedy, seeded sampling, penalties (which take the previous step's tokens first), logprobs, stop strings
    and stop tokens, mixed adapters and lengths: the same tokens, text, finish reasons and logprobs."""
    greedy = engines[False].generate(prompts(1), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, repetition_penalty=3.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.0, top_k=20, seed=5, presence_penalty=1.5,
                             frequency_penalty=0.5, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[greedy.token_ids[2]], ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, stop=["e"], ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0)]
    ps = prompts(len(params), 1)
    ps[5] = prompts(1)[0]  # stops on its third token
    outs = {mode: llm.generate(ps, params, adapters=MIXED_ROWS) for mode, llm in engines.items()}
    for a, b in zip(outs[False], outs[True]):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None:
            assert [(t.token_id, t.top.keys()) for t in a.logprobs] == [(t.token_id, t.top.keys()) for t in b.logprobs]
            # a dropped row changes the batch's shape, so its matmuls may sum in another order
            torch.testing.assert_close([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], rtol=0,
                                       atol=1e-5)
    assert outs[True][5].finish_reason == "stop" and len(outs[True][5].token_ids) == 3
    for llm in engines.values():
        assert llm.blocks.free_blocks == llm.blocks.num_blocks
        assert llm._in_flight is None or all(s.finished for s in llm._in_flight.seqs)


def test_tokens_reach_the_host_one_step_later(engines):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    sync, lagged = engines[False], engines[True]
    a = sync.add_request([5, 6, 7], params)
    assert sync.step() == [a] and len(a.completion_ids) == 1 and a.num_pending == 0
    b = lagged.add_request([5, 6, 7], params)
    assert lagged.step() == [] and b.completion_ids == [] and b.num_pending == 1 and len(b) == 4
    assert lagged.step() == [b] and len(b.completion_ids) == 1 and b.num_pending == 1  # the second on its way
    while not b.finished:
        lagged.step()
    while not a.finished:
        sync.step()
    assert b.completion_ids == a.completion_ids and b.num_pending == 0


def test_only_an_unforeseen_stop_costs_a_dropped_row(engines, monkeypatch):
    """A sequence that ends by max_tokens is not decoded past its last token; one that stops on a token (eos, a
    stop token or string) is, once: that row is computed and dropped."""
    llm = engines[True]
    rows = rows_per_step(llm, monkeypatch)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert rows == [1, 1, 1, 1]  # prefill + 3 decodes: the 4th token was known to be the last
    stop = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids[1]
    rows.clear()
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, stop_token_ids=[stop],
                                                   ignore_eos=True))[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "stop"
    assert rows == [1, 1, 1]  # prefill, the decode of token 2, and the dropped decode of token 3


def test_the_model_length_bounds_the_pending_steps(paths, monkeypatch):
    """At max_model_len the sequence ends by length without a step past it."""
    llm = engine(paths, True, max_model_len=12)
    rows = rows_per_step(llm, monkeypatch)
    out = llm.generate([[5] * 9], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length" and rows == [1, 1, 1]


def test_abort_while_a_token_is_in_flight(engines):
    llm, params = engines[True], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = engines[False].generate(prompts(2, 5), params)[1].token_ids
    gone, kept = (llm.add_request(p, params) for p in prompts(2, 5))
    llm.step()
    llm.step()
    assert gone.num_pending == 1
    llm.abort(gone)
    seen = list(gone.completion_ids)
    while not kept.finished:
        assert gone not in llm.step()
    assert gone.finish_reason == "abort" and gone.completion_ids == seen and gone.num_pending == 0
    assert kept.completion_ids == expected and llm.blocks.free_blocks == llm.blocks.num_blocks


def test_preemption_with_pending_tokens(paths):
    """16 blocks of 4 tokens for 6 sequences: preempted sequences (some with a token on the device) are
    recomputed and every output equals the synchronous engine's."""
    ps, rows = prompts(6, 2), ["r8_all", None] * 3
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = []
    for mode in (False, True):
        llm = engine(paths, mode, kv_cache_bytes=16 * 4 * 2 * 2 * 32 * 4)
        outs.append([o.token_ids for o in llm.generate(ps, params, rows)])
        assert llm.blocks.free_blocks == llm.blocks.num_blocks
    assert outs[0] == outs[1]


def test_a_prefill_reads_a_pending_token_from_the_device(engines):
    """A sequence preempted while its newest token is on the device is prefilled again with that token gathered
    from the previous step's tokens: the same logits as with the token known."""
    llm = engines[False]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    known, pending = (Sequence([9, 8, 7, 6, 5], params, None) for _ in range(2))
    pending.token_ids.pop()
    pending.num_pending, pending.pending_row = 1, 2
    for seq in (known, pending):
        llm.blocks.allocate(seq)
        seq.chunk = len(seq)
    b = llm.runner.batch([pending])
    assert b.pending_rows == [4] and b.pending_from == [2] and b.input_ids[:4] == [9, 8, 7, 6]
    try:
        want = llm.runner.run([known])
        got = llm.runner.run([pending], previous=torch.tensor([0, 0, 5, 0]))
        with pytest.raises(RuntimeError, match="pending on the device"):
            llm.runner.run([pending])
    finally:
        for seq in (known, pending):
            llm.blocks.deallocate(seq)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_penalties_count_the_token_still_on_the_device(engines):
    """A repetition penalty of 1e6 rules out repeats in the completion (while any unseen token has a positive
    logit): the penalized step must see the previous step's token, which async scheduling takes from the device
    before sampling."""
    params = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1e6, ignore_eos=True)
    free = engines[True].generate(prompts(6, 7), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert any(len(set(o.token_ids)) < len(o.token_ids) for o in free)  # unpenalized, this model repeats itself
    for mode in (False, True):
        for out in engines[mode].generate(prompts(6, 7), params):
            assert len(set(out.token_ids)) == len(out.token_ids)


def test_turning_async_scheduling_off_between_steps(paths):
    """bench_engine.py flips the flag on a running engine: the step in flight is taken with the next one, and
    nothing is lost or reported twice."""
    llm = engine(paths, True)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = engine(paths, False).generate(prompts(3, 9), params)
    seqs = [llm.add_request(p, params) for p in prompts(3, 9)]
    llm.step()
    llm.step()
    llm.async_scheduling = False
    got = llm.step()
    assert len(got) == len(set(map(id, got))) == 3 and all(s.num_pending == 0 for s in seqs)
    while not all(s.finished for s in seqs):
        llm.step()
    assert [s.completion_ids for s in seqs] == [o.token_ids for o in expected]
