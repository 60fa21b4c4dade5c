"""SGMV / BGMV on h=4096 (Punica's sweep, trimmed) against a per-adapter matmul loop (PEFT), gather + bmm over
stacked padded weights, and our kernel on contiguous (unfragmented) pages, all in the same run."""
import random

import pytest
import torch

from conftest import gpu_time_us, record

H, LAYERS, ADAPTERS = 4096, 4, 64  # LAYERS rotate per call so the adapter bytes exceed L2
POPULARITY = ["identical", "uniform", "skewed", "distinct"]
DECODE = [(16, t, p) for t in (1, 8, 32, 64) for p in POPULARITY] + [(r, 64, p) for r in (8, 64)
                                                                       for p in ("identical", "distinct")]
PREFILL = [(16, 512), (16, 2048)]


def slots_for(tokens, popularity, rng):
    ids = list(range(ADAPTERS))
    if popularity == "identical":
        return [0] * tokens
    if popularity == "uniform":
        return [rng.choice(ids) for _ in range(tokens)]
    if popularity == "skewed":
        return rng.choices(ids, weights=[1 / (i + 1) for i in ids], k=tokens)
    return [i % ADAPTERS for i in range(tokens)]


@pytest.fixture(scope="module", params=[8, 16, 64], ids=lambda r: f"r{r}")
def setup(request):
    from lorax_core.adapters import AdapterPool, PoolConfig

    rank = request.param
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = [[(torch.randn(rank, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 64,
               torch.randn(H, rank, device="cuda", generator=gen, dtype=torch.bfloat16) / 8)
              for _ in range(ADAPTERS)] for _ in range(LAYERS)]
    pools = {}
    for layout in ("paged", "contiguous"):
        need = ADAPTERS * LAYERS * rank * 8  # rows x (4 + 4 pages of 1024) per adapter and layer
        config = PoolConfig(num_layers=LAYERS, modules={"q_proj": (H, H)}, budget_bytes=need * 2048,
                            dtype=torch.bfloat16, device="cuda", page_size=1024, max_slots=ADAPTERS, max_rank=rank)
        pool = AdapterPool(config)
        if layout == "paged":  # scatter every adapter over the arena
            pages = list(pool._free_pages)
            random.Random(0).shuffle(pages)
            pool._free_pages.clear()
            pool._free_pages.extend(pages)
        for a in range(ADAPTERS):
            pool.load(f"a{a}", {(layer, "q_proj"): dense[layer][a] for layer in range(LAYERS)}, scale=2.0)
            pool.wait(f"a{a}")
        pools[layout] = pool
    stacked = [(torch.stack([a for a, _ in dense[layer]]), torch.stack([b for _, b in dense[layer]]))
               for layer in range(LAYERS)]
    return rank, dense, pools, stacked


def run_case(benchmark, setup, impl, tokens, slots, segments=None):
    from lorax_core.ops import bgmv, sgmv

    rank, dense, pools, stacked = setup
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(tokens, H, device="cuda", dtype=torch.bfloat16)
    slot_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
    groups = {a: torch.tensor([t for t, s in enumerate(slots) if s == a], device="cuda") for a in sorted(set(slots))}
    state = {"layer": 0}

    def layer():
        state["layer"] = (state["layer"] + 1) % LAYERS
        return state["layer"]

    if impl in ("paged", "contiguous"):
        pool = pools[impl]
        if segments is None:
            fn = lambda: bgmv(y, x, pool, layer(), "q_proj", slot_t)  # noqa: E731
        else:
            starts, seg = segments
            fn = lambda: sgmv(y, x, pool, layer(), "q_proj", starts, seg)  # noqa: E731
    elif impl == "loop":  # what PEFT does: one pair of matmuls per adapter in the batch
        def fn():
            weights = dense[layer()]
            for a, idx in groups.items():
                w_a, w_b = weights[a]
                y.index_add_(0, idx, 2.0 * ((x[idx] @ w_a.T) @ w_b.T))
    else:  # gather + bmm over stacked weights padded to one rank
        def fn():
            a_all, b_all = stacked[layer()]
            v = torch.bmm(x[:, None, :], a_all[slot_t.long()].transpose(1, 2))
            y.add_(2.0 * torch.bmm(v, b_all[slot_t.long()].transpose(1, 2))[:, 0])
    us, mode = gpu_time_us(benchmark, fn, calls=LAYERS * 2)
    nbytes = len(set(slots)) * 2 * rank * H * 2  # distinct adapters' A and B, bf16
    return us, nbytes / us / 1e3, mode


@pytest.mark.parametrize("impl", ["paged", "contiguous", "loop", "gather_bmm"])
@pytest.mark.parametrize("rank_tokens_pop", DECODE, ids=lambda c: f"r{c[0]}-t{c[1]}-{c[2]}")
def test_bgmv_decode(benchmark, setup, impl, rank_tokens_pop):
    rank, tokens, popularity = rank_tokens_pop
    if rank != setup[0]:
        pytest.skip("other rank")
    slots = slots_for(tokens, popularity, random.Random(tokens))
    us, gbps, mode = run_case(benchmark, setup, impl, tokens, slots)
    record(kind="lora_decode", shape=f"h{H}-r{rank}-t{tokens}-{popularity}", impl=impl, us=us, gbps=gbps, mode=mode)


@pytest.mark.parametrize("impl", ["paged", "contiguous", "loop"])
@pytest.mark.parametrize("rank_tokens", PREFILL, ids=lambda c: f"r{c[0]}-t{c[1]}")
def test_sgmv_prefill(benchmark, setup, impl, rank_tokens):
    rank, tokens = rank_tokens
    if rank != setup[0]:
        pytest.skip("other rank")
    per = tokens // 4
    slots = [a for a in (0, 1, 2, 3) for _ in range(per)]
    segments = (torch.tensor([0, per, 2 * per, 3 * per, tokens], dtype=torch.int32, device="cuda"),
                torch.tensor([0, 1, 2, 3], dtype=torch.int32, device="cuda"))
    us, gbps, mode = run_case(benchmark, setup, impl, tokens, slots, segments)
    record(kind="lora_prefill", shape=f"h{H}-r{rank}-t{tokens}-4seg", impl=impl, us=us, gbps=gbps, mode=mode)
