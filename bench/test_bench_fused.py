"""A batch-1 NF4 decode layer's fused kernels against the separate ops they replace, in the same run (Mistral-7B
shapes, one rank-16 adapter on every projection):
- nf4_linear_sgmv at one row (the LoRA shrink, then the GEMV with the LoRA expand, and SwiGLU for gate / up, in its
  epilogue) against nf4_linear + sgmv (+ silu_mul);
- the same GEMV with the shrink already done by the norm (add_rms_norm_sgmv_shrink), as the model runs q/k/v and
  gate / up, against the same separate ops;
- add_rms_norm_sgmv_shrink against add_rms_norm + sgmv_shrink;
- gate | up with down's LoRA shrink in the GEMV's epilogue (nf4_linear_sgmv_silu_shrink) against the same GEMV, then
  sgmv_shrink of its output (both with v from the norm).
The fused q | k | v and gate | up weights are built as the model loader builds them: each part quantized alone,
then NF4Weight.cat, which keeps the parts' double-quantized absmax with an offset each; their "fp32 absmax" rows
time the same projection with the absmax in fp32, as the fusions had it before (8% more bytes, no nested lookup).
GB/s counts the NF4 weight's bytes (codes + absmax) per call."""
import pytest
import torch

from conftest import copies_for, gpu_time_us, record, rotating

HIDDEN, INTER, KV = 4096, 14336, 1024
MODULES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
PROJECTIONS = {  # name: (modules, silu_mul)
    "qkv": (["q_proj", "k_proj", "v_proj"], False),
    "o": (["o_proj"], False),
    "gate_up": (["gate_proj", "up_proj"], True),
    "down": (["down_proj"], False),
}
RANK = 16


@pytest.fixture(scope="module")
def fused_setup():
    from lorax_core.adapters import AdapterPool, PoolConfig
    from lorax_core.quant import NF4Weight

    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {(0, m): (torch.randn(RANK, n_in, device="cuda", generator=gen, dtype=torch.bfloat16) / 64,
                        torch.randn(n_out, RANK, device="cuda", generator=gen, dtype=torch.bfloat16) / 8)
               for m, (n_in, n_out) in MODULES.items()}
    pages = sum(RANK * (-(-n_in // 1024) - (-n_out // 1024)) for n_in, n_out in MODULES.values())
    pool = AdapterPool(PoolConfig(num_layers=1, modules=MODULES, budget_bytes=2 * pages * 2048, dtype=torch.bfloat16,
                                  device="cuda", page_size=1024, max_slots=4, max_rank=64))
    pool.load("a", weights, scale=2.0)
    pool.wait("a")
    segments = (torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                torch.tensor([pool.slot("a")], dtype=torch.int32, device="cuda"))
    def projection(modules):  # as lorax_core.model.loader builds it
        return [NF4Weight.quantize(torch.randn(MODULES[m][1], MODULES[m][0], device="cuda", dtype=torch.bfloat16), 64,
                                   True) for m in modules]

    nf4 = {}
    for name, (modules, _) in PROJECTIONS.items():
        first = projection(modules)
        parts = [first] + [projection(modules) for _ in range(copies_for(NF4Weight.cat(first).nbytes) - 1)]
        nf4[name] = [NF4Weight.cat(p) for p in parts]
        if len(modules) > 1:
            assert nf4[name][0].part_starts  # the shapes fill nested blocks: the parts keep their 8-bit absmax
            nf4[f"{name}, fp32 absmax"] = [NF4Weight.cat(p, keep_double_quant=False) for p in parts]
    return pool, segments, nf4


@pytest.mark.parametrize("impl", ["fused", "fused, v from the norm", "fused, v from the norm, fp32 absmax",
                                  "separate"])
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_fused_projection(benchmark, fused_setup, proj, impl):
    from lorax_core.ops import nf4_linear, nf4_linear_sgmv, sgmv, silu_mul

    pool, (starts, slots), nf4 = fused_setup
    modules, silu = PROJECTIONS[proj]
    x = torch.randn(1, MODULES[modules[0]][0], device="cuda", dtype=torch.bfloat16)
    if impl.endswith("fp32 absmax"):
        if len(modules) == 1:
            pytest.skip("one part: its absmax stays as quantized")
        nxt, calls = rotating(nf4[f"{proj}, fp32 absmax"])
        impl_fn = "fused, v from the norm"
    else:
        nxt, calls = rotating(nf4[proj])
        impl_fn = impl
    if impl_fn == "fused":
        fn = lambda: nf4_linear_sgmv(x, nxt(), None, pool, 0, modules, starts, slots, silu_mul=silu)  # noqa: E731
    elif impl_fn == "fused, v from the norm":
        v = torch.ops.lorax_core.sgmv_shrink(x, pool.arena, pool.page_table, pool.ranks, starts, slots, 0,
                                             [pool.module_index(m) for m in modules], pool.page_size)
        fn = lambda: nf4_linear_sgmv(x, nxt(), None, pool, 0, modules, starts, slots, silu_mul=silu, v=v)  # noqa: E731
    else:
        def fn():
            y = nf4_linear(x, nxt())
            sgmv(y, x, pool, 0, modules, starts, slots)
            return silu_mul(*y.chunk(2, dim=-1)) if silu else y

    us, mode = gpu_time_us(benchmark, fn, calls)
    nbytes = nf4[f"{proj}, fp32 absmax" if impl.endswith("fp32 absmax") else proj][0].nbytes
    record(kind="nf4_fused", shape=proj, impl=impl, us=us, gbps=nbytes / us / 1e3, mode=mode)


@pytest.mark.parametrize("impl", ["fused", "separate"])
@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_norm_with_shrink(benchmark, fused_setup, proj, impl):
    from lorax_core.ops import add_rms_norm, add_rms_norm_sgmv_shrink

    pool, (starts, slots), _ = fused_setup
    modules = PROJECTIONS[proj][0]
    x, residual = torch.randn(2, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    indices = [pool.module_index(m) for m in modules]
    if impl == "fused":
        fn = lambda: add_rms_norm_sgmv_shrink(x, residual, weight, 1e-5, pool, 0, modules, starts, slots)  # noqa: E731
    else:
        def fn():
            out, _ = add_rms_norm(x, residual, weight, 1e-5)
            return torch.ops.lorax_core.sgmv_shrink(out, pool.arena, pool.page_table, pool.ranks, starts, slots, 0,
                                                    indices, pool.page_size)

    us, mode = gpu_time_us(benchmark, fn, calls=32)
    nbytes = len(modules) * RANK * HIDDEN * 2 + 3 * HIDDEN * 2  # the A rows, x, residual and the norm weight
    record(kind="norm_shrink", shape=f"norm + {proj} shrink", impl=impl, us=us, gbps=nbytes / us / 1e3, mode=mode)


@pytest.mark.parametrize("impl", ["one kernel", "GEMV, then shrink"])
def test_gate_up_with_down_shrink(benchmark, fused_setup, impl):
    from lorax_core.ops import nf4_linear_sgmv, nf4_linear_sgmv_silu_shrink

    pool, (starts, slots), nf4 = fused_setup
    modules = PROJECTIONS["gate_up"][0]
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    v = torch.ops.lorax_core.sgmv_shrink(x, pool.arena, pool.page_table, pool.ranks, starts, slots, 0,
                                         [pool.module_index(m) for m in modules], pool.page_size)
    counters = torch.zeros(1, dtype=torch.int32, device="cuda")
    nxt, calls = rotating(nf4["gate_up"])
    if impl == "one kernel":
        def fn():
            return nf4_linear_sgmv_silu_shrink(x, nxt(), None, pool, 0, modules, starts, slots, "down_proj", v=v,
                                               counters=counters)
    else:
        def fn():
            h = nf4_linear_sgmv(x, nxt(), None, pool, 0, modules, starts, slots, silu_mul=True, v=v)
            return h, torch.ops.lorax_core.sgmv_shrink(h, pool.arena, pool.page_table, pool.ranks, starts, slots, 0,
                                                       [pool.module_index("down_proj")], pool.page_size)

    us, mode = gpu_time_us(benchmark, fn, calls)
    record(kind="mlp_shrink", shape="gate_up + down's shrink", impl=impl, us=us,
           gbps=nf4["gate_up"][0].nbytes / us / 1e3, mode=mode)
