"""SGMV / BGMV (Punica's sweep, trimmed) against a per-adapter matmul loop (PEFT), gather + bmm over stacked padded
weights, our kernel on contiguous (unfragmented) pages, our kernel with programmatic dependent launch off, and (for
decode) the shrink and expand ops one after the other, which is what bgmv runs where it has no one-kernel path (below
sm_90, or over 64 tokens), all in the same run. Shapes: h = 4096 (q_proj) for the whole sweep, and the MLP's
4096 -> 14336 (gate / up) and 14336 -> 4096 (down) at rank 16."""
import random

import pytest
import torch

from conftest import gpu_time_us, record

LAYERS, ADAPTERS = 4, 64  # LAYERS rotate per call so the adapter bytes exceed L2
MODULES = {"q_proj": (4096, 4096), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
LABELS = {"q_proj": "h4096", "gate_proj": "mlp-4096x14336", "down_proj": "mlp-14336x4096"}
POPULARITY = ["identical", "uniform", "skewed", "distinct"]
DECODE = ([("q_proj", 16, t, p) for t in (1, 8, 32, 64) for p in POPULARITY]
          + [("q_proj", r, 64, p) for r in (8, 64) for p in ("identical", "distinct")]
          + [(m, 16, t, p) for m in ("gate_proj", "down_proj") for t in (1, 64) for p in ("identical", "distinct")])
PREFILL = [("q_proj", 16, 512), ("q_proj", 16, 2048), ("gate_proj", 16, 2048), ("down_proj", 16, 2048)]


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
    modules = MODULES if rank == 16 else {"q_proj": MODULES["q_proj"]}  # the MLP shapes run at rank 16 only
    gen = torch.Generator(device="cuda").manual_seed(0)

    def weights(n_in, n_out):
        return (torch.randn(rank, n_in, device="cuda", generator=gen, dtype=torch.bfloat16) / 64,
                torch.randn(n_out, rank, device="cuda", generator=gen, dtype=torch.bfloat16) / 8)

    # dense[module][layer][adapter] = (A [r, in], B [out, r])
    dense = {m: [[weights(*dims) for _ in range(ADAPTERS)] for _ in range(LAYERS)] for m, dims in modules.items()}
    pages = sum(rank * (-(-n_in // 1024) - (-n_out // 1024)) for n_in, n_out in modules.values())
    pools = {}
    for layout in ("paged", "contiguous"):
        config = PoolConfig(num_layers=LAYERS, modules=modules, budget_bytes=ADAPTERS * LAYERS * pages * 2048,
                            dtype=torch.bfloat16, device="cuda", page_size=1024, max_slots=ADAPTERS, max_rank=rank)
        pool = AdapterPool(config)
        if layout == "paged":  # scatter every adapter over the arena
            free = list(pool._free_pages)
            random.Random(0).shuffle(free)
            pool._free_pages.clear()
            pool._free_pages.extend(free)
        for a in range(ADAPTERS):
            pool.load(f"a{a}", {(layer, m): dense[m][layer][a] for m in modules for layer in range(LAYERS)}, scale=2.0)
            pool.wait(f"a{a}")
        pools[layout] = pool
    stacked = {m: [(torch.stack([a for a, _ in per_layer]), torch.stack([b for _, b in per_layer]))
                   for per_layer in dense[m]] for m in modules}
    return rank, dense, pools, stacked


def run_case(benchmark, setup, impl, module, tokens, slots, segments=None):
    from lorax_core._library import set_programmatic_launch

    was = set_programmatic_launch(impl != "paged_pdl_off")  # read at each launch, kept by the CUDA graph
    try:
        return timed_case(benchmark, setup, impl, module, tokens, slots, segments)
    finally:
        set_programmatic_launch(was)


def timed_case(benchmark, setup, impl, module, tokens, slots, segments):
    from lorax_core.ops import bgmv, sgmv

    rank, dense, pools, stacked = setup
    n_in, n_out = MODULES[module]
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(tokens, n_out, device="cuda", dtype=torch.bfloat16)
    slot_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
    groups = {a: torch.tensor([t for t, s in enumerate(slots) if s == a], device="cuda") for a in sorted(set(slots))}
    state = {"layer": 0}

    def layer():
        state["layer"] = (state["layer"] + 1) % LAYERS
        return state["layer"]

    if impl == "two_kernels":  # BGMV's shrink and expand ops: v through memory, two kernels' latency
        pool = pools["paged"]
        common, m = (pool.arena, pool.page_table, pool.ranks), [pool.module_index(module)]

        def fn():
            at = layer()
            v = torch.ops.lorax_core.bgmv_shrink(x, *common, slot_t, at, m, pool.page_size)
            torch.ops.lorax_core.bgmv_expand(y, v, *common, pool.scales, slot_t, at, m, [0, n_out], pool.page_size)
    elif impl in ("paged", "contiguous", "paged_pdl_off"):
        pool = pools["contiguous" if impl == "contiguous" else "paged"]
        if segments is None:
            fn = lambda: bgmv(y, x, pool, layer(), module, slot_t)  # noqa: E731
        else:
            starts, seg = segments
            fn = lambda: sgmv(y, x, pool, layer(), module, starts, seg)  # noqa: E731
    elif impl == "loop":  # what PEFT does: one pair of matmuls per adapter in the batch
        def fn():
            weights = dense[module][layer()]
            for a, idx in groups.items():
                w_a, w_b = weights[a]
                y.index_add_(0, idx, 2.0 * ((x[idx] @ w_a.T) @ w_b.T))
    else:  # gather + bmm over stacked weights padded to one rank
        def fn():
            a_all, b_all = stacked[module][layer()]
            v = torch.bmm(x[:, None, :], a_all[slot_t.long()].transpose(1, 2))
            y.add_(2.0 * torch.bmm(v, b_all[slot_t.long()].transpose(1, 2))[:, 0])
    us, mode = gpu_time_us(benchmark, fn, calls=LAYERS * 8)  # 32 calls per replay: its launch is a small share
    nbytes = len(set(slots)) * rank * (n_in + n_out) * 2  # distinct adapters' A and B, bf16
    return us, nbytes / us / 1e3, mode


@pytest.mark.parametrize("impl", ["paged", "contiguous", "loop", "gather_bmm", "paged_pdl_off", "two_kernels"])
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[0]}-r{c[1]}-t{c[2]}-{c[3]}")
def test_bgmv_decode(benchmark, setup, impl, case):
    module, rank, tokens, popularity = case
    if rank != setup[0]:
        pytest.skip("other rank")
    slots = slots_for(tokens, popularity, random.Random(tokens))
    us, gbps, mode = run_case(benchmark, setup, impl, module, tokens, slots)
    record(kind="lora_decode", shape=f"{LABELS[module]}-r{rank}-t{tokens}-{popularity}", impl=impl, us=us, gbps=gbps,
           mode=mode)


@pytest.mark.parametrize("impl", ["paged", "contiguous", "loop"])
@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"{c[0]}-r{c[1]}-t{c[2]}")
def test_sgmv_prefill(benchmark, setup, impl, case):
    module, rank, tokens = case
    if rank != setup[0]:
        pytest.skip("other rank")
    per = tokens // 4
    slots = [a for a in (0, 1, 2, 3) for _ in range(per)]
    segments = (torch.tensor([0, per, 2 * per, 3 * per, tokens], dtype=torch.int32, device="cuda"),
                torch.tensor([0, 1, 2, 3], dtype=torch.int32, device="cuda"))
    us, gbps, mode = run_case(benchmark, setup, impl, module, tokens, slots, segments)
    record(kind="lora_prefill", shape=f"{LABELS[module]}-r{rank}-t{tokens}-4seg", impl=impl, us=us, gbps=gbps,
           mode=mode)
