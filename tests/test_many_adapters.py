"""Dozens of adapters of mixed ranks through a device pool that holds a few: hundreds of requests in one run,
each output equal to transformers + PEFT with that request's adapter; nothing leaked at the end; no adapter
waits longer than the exchange policy's bound."""
import random

import pytest

from model_helpers import ALL_MODULES, hf_greedy_mixed, hf_peft_model, save_adapter, save_model
from lorax_core import LLM, SamplingParams

NUM_ADAPTERS, NUM_REQUESTS, MAX_TOKENS = 24, 240, 4
RANKS = [1, 2, 4, 8, 16, 32]
TARGETS = [ALL_MODULES, ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], ["k_proj", "o_proj"]]
TIME_SLICE = 6  # steps of the fake clock


class StepClock:
    """The scheduler's clock, advanced one tick per engine step: waits are measured in steps, not CI seconds."""

    def __init__(self, llm):
        self.now, self._step = 0.0, llm.step
        llm.scheduler.clock, llm.step = self, self.step

    def __call__(self) -> float:
        return self.now

    def step(self):
        self.now += 1
        return self._step()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    base = save_model(root / "base", "llama", tokenizer=False)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        r = RANKS[i % len(RANKS)]
        adapters[f"a{i}_r{r}"] = save_adapter(base, root / f"a{i}", seed=100 + i, r=r, lora_alpha=2 * r,
                                              target_modules=TARGETS[i % len(TARGETS)], use_rslora=i % 5 == 0)
    return base, adapters


def test_hundreds_of_requests_over_dozens_of_adapters_match_peft(many):
    base, adapters = many
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=12, max_lora_rank=32,
              max_active_adapters=4, adapter_time_slice_s=TIME_SLICE, kv_cache_bytes=40 * 4 * 512,  # 40 blocks:
              host_adapter_cache_bytes=2**19, adapter_pool_bytes=2**18)  # preemption; room for ~6 adapters
    clock = StepClock(llm)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    rng = random.Random(0)
    names = list(adapters)
    popular = names[:3]  # a skewed mix: half the requests go to three adapters
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([3, 8, 13, 21]))] for _ in range(NUM_REQUESTS)]
    rows = [rng.choice(popular) if rng.random() < 0.5 else rng.choice(names) for _ in range(NUM_REQUESTS)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), rows)

    expected = hf_greedy_mixed(hf_peft_model(base, adapters), prompts, rows, MAX_TOKENS)
    for name, out, tokens in zip(rows, outs, expected):
        assert out.finish_reason == "length" and out.token_ids == tokens, name

    # Nothing leaked: every KV block and adapter page is back, no pins, no active adapters.
    assert llm.blocks.free_blocks == llm.blocks.num_blocks
    pool = llm.pool
    assert pool.free_pages + sum(len(pool._resident[n].pages) for n in pool.resident) == pool.num_pages
    assert all(pool._resident[n].pins == 0 for n in pool.resident)
    assert not llm.scheduler.active and not llm.scheduler.demand and not llm.scheduler.waiting
    assert llm.registry.host_bytes <= 2**19

    # The pool was really too small: adapters were exchanged many times, and the counters add up.
    infos = {i.name: i for i in llm.list_adapters()}
    assert len(pool.resident) <= 4 and sum(i.stats.evictions for i in infos.values()) > NUM_ADAPTERS
    assert sum(i.stats.requests for i in infos.values()) == NUM_REQUESTS
    assert sum(i.stats.generated_tokens for i in infos.values()) == NUM_REQUESTS * MAX_TOKENS
    assert all(i.stats.device_loads >= 1 for i in infos.values())
    assert any(o.metrics.first_scheduled_time - o.metrics.arrival_time > 0 for o in outs)
    assert clock.now > 0


def _hot_traffic_wait(llm, cold: str, hot: list[str], steps: int) -> int:
    """Keep the hot adapters busy with a new request every step; return how many steps the cold adapter's one
    request waited before it was scheduled (or `steps` if it never was)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for name in hot:
        llm.add_request([5, 6, 7], params, name)
    llm.step()
    seq = llm.add_request([8, 9, 10], params, cold)
    for step in range(steps):
        if seq.first_scheduled_time is not None:
            waited = step
            break
        for name in hot:
            llm.add_request([5, 6, 7], params, name)
        llm.step()
    else:
        waited = steps
    for s in list(llm.scheduler.waiting) + list(llm.scheduler.running):
        llm.abort(s)
    return waited


@pytest.mark.parametrize("time_slice,starves", [(TIME_SLICE, False), (10**9, True)])
def test_waiting_is_bounded_by_the_time_slice(many, time_slice, starves):
    """Two hot adapters fill both places; a third adapter's request is scheduled within time slice + the
    longest running request (in steps). Without exchange (a huge time slice) it starves: the bound means something."""
    base, adapters = many
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=4, max_lora_rank=32,
              max_active_adapters=2, adapter_time_slice_s=time_slice, adapter_loader_threads=0)
    StepClock(llm)
    for name, path in list(adapters.items())[:3]:
        llm.load_adapter(name, path)
    hot, cold = list(adapters)[:2], list(adapters)[2]
    bound = TIME_SLICE + 2 * (MAX_TOKENS + 4)  # slice, then the drained adapter's running requests end
    waited = _hot_traffic_wait(llm, cold, hot, steps=200)
    assert (waited > bound) == starves, waited
    assert llm.blocks.free_blocks == llm.blocks.num_blocks
