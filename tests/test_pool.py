"""Adapter pool bookkeeping: no page leaks, pinned adapters never evicted, LRU order, clear refusals."""
import random

import pytest
import torch

from lora_helpers import make_pool, random_adapter
from lorax_core.adapters import PoolFullError

MODULES = {"q_proj": (32, 32), "v_proj": (32, 8), "down_proj": (80, 32)}


def assert_consistent(pool):
    used = [p for name in pool.resident for p in pool._entry(name).pages]
    assert len(used) == len(set(used)), "a page is owned twice"
    assert len(used) + pool.free_pages == pool.num_pages, "pages leaked"


def test_thousands_of_random_cycles_leak_nothing():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    pool = make_pool(MODULES, budget_pages=600, page_size=16, max_slots=6, max_rank=32)
    library = {f"a{i}": random_adapter(MODULES, [rng.randint(1, 32)], gen=gen) for i in range(12)}
    pins: dict[str, int] = {}
    for _ in range(3000):
        name = rng.choice(list(library))
        op = rng.random()
        if op < 0.5:
            try:
                pool.load(name, library[name], 1.0)
            except PoolFullError:
                assert all(pins.get(n, 0) for n in pool.resident) or pool.free_pages < pool.pages_needed(library[name])
        elif op < 0.7 and name in pool.resident:
            pool.pin(name)
            pins[name] = pins.get(name, 0) + 1
        elif op < 0.9 and pins.get(name):
            pool.unpin(name)
            pins[name] -= 1
        elif name in pool.resident and not pins.get(name):
            pool.evict(name)
        for n, count in pins.items():
            assert count == 0 or n in pool.resident, "a pinned adapter was evicted"
        assert_consistent(pool)
    for n, count in pins.items():
        for _ in range(count):
            pool.unpin(n)
    for n in pool.resident:
        pool.evict(n)
    assert pool.free_pages == pool.num_pages and not pool.resident


def test_lru_adapter_is_evicted_first_and_ranks_cleared():
    gen = torch.Generator().manual_seed(0)
    weights = {n: random_adapter(MODULES, [8], gen=gen) for n in "abc"}
    need = make_pool(MODULES).pages_needed(weights["a"])
    pool = make_pool(MODULES, budget_pages=2 * need, page_size=64)
    slot_a = pool.load("a", weights["a"], 1.0)
    pool.load("b", weights["b"], 1.0)
    pool.pin("a")  # a is now the most recently used
    pool.unpin("a")
    pool.load("c", weights["c"], 1.0)
    assert pool.resident == ["a", "c"]
    assert pool.ranks[pool.slot("a")].sum() > 0 and slot_a == pool.slot("a")


def test_full_pool_of_pinned_adapters_says_so():
    gen = torch.Generator().manual_seed(0)
    weights = {n: random_adapter(MODULES, [8], gen=gen) for n in "ab"}
    pool = make_pool(MODULES, budget_pages=make_pool(MODULES).pages_needed(weights["a"]), page_size=64)
    pool.load("a", weights["a"], 1.0)
    pool.pin("a")
    with pytest.raises(PoolFullError, match="all 1 resident adapters are pinned by running requests"):
        pool.load("b", weights["b"], 1.0)
    assert pool.resident == ["a"]
    assert_consistent(pool)
    with pytest.raises(RuntimeError, match="in use by 1 running request"):
        pool.evict("a")


def test_bad_adapters_are_refused_with_the_reason():
    pool = make_pool(MODULES, max_rank=16)
    with pytest.raises(ValueError, match="rank 32 is outside 1..16"):
        pool.load("big", random_adapter(MODULES, [32]), 1.0)
    with pytest.raises(ValueError, match=r"expected A \[r, 32\] and B \[32, r\]"):
        pool.load("bad", {(0, "q_proj"): (torch.randn(4, 31), torch.randn(32, 4))}, 1.0)
    with pytest.raises(ValueError, match="not a layer/module of this model"):
        pool.load("bad", {(0, "o_proj"): (torch.randn(4, 32), torch.randn(32, 4))}, 1.0)
    assert pool.free_pages == pool.num_pages


def test_failed_load_leaves_nothing_behind(monkeypatch):
    pool = make_pool(MODULES)

    def broken_copy(*args):
        raise RuntimeError("simulated copy failure")

    monkeypatch.setattr(pool, "_store", broken_copy)
    with pytest.raises(RuntimeError, match="simulated copy failure"):
        pool.load("broken", random_adapter(MODULES, [4]), 1.0)
    assert pool.free_pages == pool.num_pages and not pool.resident
    monkeypatch.undo()
    pool.load("ok", random_adapter(MODULES, [4]), 1.0)
    assert pool.resident == ["ok"]
