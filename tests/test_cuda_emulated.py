"""Our CUDA kernels run on the CPU by the emulator in tests/cuda_emu, against the CPU ops.

CI has no GPU, and some kernels are written in sessions that have none. The emulator compiles the kernels and
their host code (unchanged) as C++, runs each CUDA thread as a fiber, and builds them with
AddressSanitizer and UndefinedBehaviorSanitizer. It catches indexing errors and wrong results, loads and stores out
of bounds or misaligned, a missing __syncthreads that a reversed thread order exposes, deadlocks, and launch shapes
a GPU refuses; not timing, lockstep warps or the memory model (tests/cuda_emu/cuda_emu.h says what it models).

`test_emulated_kernels` runs the tests marked `emulated` in a subprocess with libasan preloaded. To run them here
without the sanitizers: LORAX_EMU=1 python -m pytest tests/test_cuda_emulated.py -m emulated
"""
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (FLOAT_DTYPES, HAS_CUDA, NF4_GEMV_MAX_ROWS, assert_close, assert_nf4_linear, assert_rounds_exact,
                      nf4_gemv_weight)
from cuda_emu import build
from lora_helpers import POPULARITY, make_pool, random_adapter, token_slots
from lorax_core.ops import bgmv, kv_cache_write, nf4_linear, nf4_linear_sgmv_silu_shrink, paged_attention_decode, sgmv
from lorax_core.ops import paged_attention_decode_sgmv_shrink
from lorax_core.quant import NF4Weight
from test_attention_ops import SHRINK_CASES as ATTENTION_SHRINK_CASES
from test_attention_ops import attention_shrink_case, check_device_attention_shrink, random_cache
from test_layer_ops import qkv_views, rotary_cache_inputs
from test_nf4_sgmv import CASES as NF4_SGMV_CASES
from test_nf4_sgmv import QKV as NF4_SGMV_MODULES
from test_nf4_sgmv import case_id as nf4_sgmv_case_id
from test_nf4_sgmv import check_device_norm_shrink as check_norm_shrink
from test_nf4_sgmv import MLP_CASES, QKV_CASES, QKV_ODD, check_device_rotary, check_device_silu_shrink
from test_nf4_sgmv import check_device_fused_parts, mlp_case_id, silu_shrink_case
from test_nf4_sgmv import check_device_op as check_nf4_sgmv

MODE = os.environ.get("LORAX_EMU")  # "asan" inside test_emulated_kernels' subprocess
emulated = pytest.mark.emulated


def test_emulated_kernels():
    """Runs this file's emulated tests with the sanitizers in a subprocess (libasan must be loaded first)."""
    if HAS_CUDA:
        pytest.skip("a GPU runs the kernels themselves (pytest -m cuda)")
    if MODE:
        pytest.skip("this is the subprocess")
    env = build.asan_env()
    if env is None or not build.cuda_include_dirs():
        pytest.skip("needs gcc's libasan and the CUDA headers")
    env["LORAX_EMU"] = "asan"
    # -s: a sanitizer's or the emulator's report goes to stderr just before the process aborts
    cmd = [sys.executable, "-m", "pytest", __file__, "-m", "emulated", "-q", "-s", "-p", "no:cacheprovider", "-rfE",
           "--tb=short"]
    result = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                            timeout=1800)
    print(result.stdout[-3000:])
    found = [i for i in (result.stderr.find(m) for m in ("AddressSanitizer", "runtime error:", "cuda_emu: ")) if i >= 0]
    start = result.stderr.rfind("\n", 0, min(found)) + 1 if found else max(0, len(result.stderr) - 8000)
    stderr = result.stderr[start:start + 8000]
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-12000:]}\n{stderr}"


def test_emulator_refuses_launches_past_lorax_launch():
    """Kernels are launched with lorax::launch (programmatic dependent launch; the emulator checks each kernel's
    pdl_prologue()), so a `<<<>>>` launch in csrc fails the emulated build with a message that says so."""
    assert "pdl_prologue" in build.rewrite_kernels("__global__ void k() { pdl_prologue(); }", "x.cu")
    with pytest.raises(ValueError, match="lorax::launch"):
        build.rewrite_kernels("void f() { k<<<1, 32>>>(); }", "x.cu")


@pytest.fixture(scope="module")
def emu():
    """A context manager: inside it, torch.ops.lorax_core.<op> runs the emulated CUDA kernel of each op that
    has one (so the lorax_core.ops wrappers and the model run them); outside, the CPU kernels."""
    if not MODE:
        pytest.skip("run by test_emulated_kernels (or set LORAX_EMU=1)")
    module = build.load(asan=MODE == "asan")
    all_names = torch._C._dispatch_get_all_op_names()
    core = {n.split("::")[1] for n in all_names if n.startswith("lorax_core::")}
    names = [n.split("::")[1] for n in all_names if n.startswith("lorax_emu::")]
    ops = {n: getattr(torch.ops.lorax_emu, n) for n in names  # not the emulator's own (hooks.cpp: late_write)
           if n in core and torch._C._dispatch_has_kernel_for_dispatch_key(f"lorax_emu::{n}", "CPU")}

    @contextlib.contextmanager
    def on_emulator():
        saved = {n: getattr(torch.ops.lorax_core, n) for n in ops}
        for n, op in ops.items():
            setattr(torch.ops.lorax_core, n, op)
        try:
            yield
        finally:
            for n, op in saved.items():
                setattr(torch.ops.lorax_core, n, op)

    on_emulator.ops = set(ops)
    on_emulator.module = module
    return on_emulator


@pytest.fixture(params=[False, True], ids=["registers", "staged"])
def gemv_staging(request, emu):
    """Each of the NF4 GEMV's main loops (set_nf4_gemv_staging): loads into registers, or staged in shared memory
    by cp.async. Their results are equal bit for bit, so the tests of the GEMV run with both; the staged loop's
    code is one for both 16-bit dtypes and serves up to 8 rows, so it skips fp16 and m > 8 (CI's time)."""
    params = request.node.callspec.params
    if request.param and (params.get("dtype") == torch.float16 or params.get("m", 1) > NF4_GEMV_MAX_ROWS):
        pytest.skip("the staged loop: bf16 and at most 8 rows cover its code")
    was = emu.module.set_nf4_gemv_staging(request.param)
    yield request.param
    emu.module.set_nf4_gemv_staging(was)


# ---------------------------------------------------------------------------------------------------- LoRA

MODULES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096),
           "odd": (100, 52)}
RANKS = [[8], [16], [1, 128], [4, 32]]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16, torch.float16], ids=str)
def pool(request):
    gen = torch.Generator().manual_seed(0)
    pool = make_pool(MODULES, num_layers=1, budget_pages=10100, page_size=512, dtype=request.param)
    for i, ranks in enumerate(RANKS):
        pool.load(f"a{i}", random_adapter(MODULES, ranks, num_layers=1, gen=gen), 0.5 + i)
    assert not pool.evictions, "the pool must hold every adapter, or the tests see fewer ranks than they name"
    return pool


def _lora_inputs(pool, tokens, n_in, n_out, popularity, seed=0):
    slots = token_slots(tokens, list(range(len(RANKS))), popularity, base_every=5, rng=random.Random(seed))
    x, y = torch.randn(tokens, n_in).to(pool.config.dtype), torch.randn(tokens, n_out).to(pool.config.dtype)
    return x, y, torch.tensor(slots, dtype=torch.int32)


@emulated
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("module,tokens", [("k_proj", 33), ("q_proj", 1), ("gate_proj", 5), ("down_proj", 3),
                                           ("odd", 70)])
def test_bgmv(emu, pool, popularity, module, tokens):
    x, y, slots = _lora_inputs(pool, tokens, *MODULES[module], popularity)
    expected = bgmv(y.clone(), x, pool, 0, module, slots)
    with emu():
        assert_close(bgmv(y.clone(), x, pool, 0, module, slots), expected, scale=4)


@emulated
@pytest.mark.parametrize("lengths", [[40], [30, 0, 21], [1, 2, 3, 70], [9] * 5])
def test_sgmv(emu, pool, lengths):
    seg = torch.tensor([i % len(RANKS) - (i == 2) * 10 for i in range(len(lengths))], dtype=torch.int32).clamp(-1)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x, y, _ = _lora_inputs(pool, sum(lengths), 4096, 1024, "uniform")
    expected = sgmv(y.clone(), x, pool, 0, "k_proj", starts, seg)
    with emu():
        assert_close(sgmv(y.clone(), x, pool, 0, "k_proj", starts, seg), expected, scale=4)


@emulated
@pytest.mark.parametrize("lengths", [[1], [3, 0, 1], [4, 5, 2, 1], [16], [2, 1, 1, 1, 3, 1, 2, 1, 1]])
@pytest.mark.parametrize("module", ["q_proj", "down_proj", "odd"])
def test_sgmv_decode(emu, pool, module, lengths):
    """Decode-sized SGMV (at most 16 tokens): on sm_90 one kernel, a cluster of CTAs per tile of a segment's tokens
    and module that share v on chip (apply_kernel); tiles of 1 to 4 tokens, a segment of base rows, an adapter
    outside the pool. The shrink and expand ops one after the other take the two-kernel path: the same sums."""
    seg = torch.tensor([(i % (len(RANKS) + 1)) - 1 for i in range(len(lengths))], dtype=torch.int32)
    if len(lengths) > 3:
        seg[3] = 99  # outside the pool: no adapter
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x, y, _ = _lora_inputs(pool, sum(lengths), *MODULES[module], "uniform", seed=len(lengths))
    expected = sgmv(y.clone(), x, pool, 0, module, starts, torch.where(seg == 99, -1, seg))  # the CPU op refuses 99
    m = [pool.module_index(module)]
    common = (pool.arena, pool.page_table, pool.ranks)
    with emu():
        assert_close(sgmv(y.clone(), x, pool, 0, module, starts, seg), expected, scale=4)
        v = torch.ops.lorax_core.sgmv_shrink(x, *common, starts, seg, 0, m, pool.page_size)
        got = y.clone()
        torch.ops.lorax_core.sgmv_expand(got, v, *common, pool.scales, starts, seg, 0, m, [0, y.shape[1]],
                                         pool.page_size)
    assert_close(got, expected, scale=4)


@emulated
@pytest.mark.parametrize("op", ["bgmv", "bgmv_shrink", "sgmv", "sgmv_shrink", "norm_shrink"])
def test_lora_kernels_read_the_indices_again_after_the_pdl_wait(emu, pool, op):
    """The decode kernels guess their tile and adapter before their PDL wait, and read the pool for the guess
    (TileAdapter in lora_kernels.cu); the kernel before them may still be writing the adapter indices or segments
    then. Here it is (cuda_emu.h's late write): every block reads the old ones before its wait and the new ones
    after, so every guess is wrong. The results must be the new indices', which differ from the old ones'."""
    dtype = pool.config.dtype
    if op == "norm_shrink" and dtype == torch.float32:
        pytest.skip("one kernel for fp16 / bf16 only (fp32 takes add_rms_norm, then sgmv_shrink)")
    m = [pool.module_index("k_proj")]
    common = (pool.arena, pool.page_table, pool.ranks)
    tokens = 1 if op == "norm_shrink" else 5
    x, y, _ = _lora_inputs(pool, tokens, 4096, 1024, "uniform", seed=7)
    residual, weight = torch.randn(tokens, 4096).to(dtype), torch.rand(4096).to(dtype) + 0.5
    if op.startswith("bgmv"):
        old = [torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32)]
        new = [torch.tensor([3, -1, 1, 0, 2], dtype=torch.int32)]
    elif op.startswith("sgmv"):
        old = [torch.tensor([0, 1, 3, 5], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)]
        new = [torch.tensor([0, 2, 3, 5], dtype=torch.int32), torch.tensor([3, -1, 1], dtype=torch.int32)]
    else:
        old = [torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)]
        new = [torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)]

    def run(*groups):
        if op == "bgmv":
            return bgmv(y.clone(), x, pool, 0, "k_proj", *groups)
        if op == "sgmv":
            return sgmv(y.clone(), x, pool, 0, "k_proj", *groups)
        if op == "bgmv_shrink":
            return torch.ops.lorax_core.bgmv_shrink(x, *common, *groups, 0, m, pool.page_size)
        if op == "sgmv_shrink":
            return torch.ops.lorax_core.sgmv_shrink(x, *common, *groups, 0, m, pool.page_size)
        return torch.ops.lorax_core.add_rms_norm_sgmv_shrink(x, residual, weight, 1e-5, *common, *groups, 0, m,
                                                             pool.page_size)[2]

    expected, stale = run(*new), run(*old)
    assert not torch.equal(expected, stale)
    inputs = [t.clone() for t in old]
    for t, fresh in zip(inputs, new):
        torch.ops.lorax_emu.late_write(t, fresh)
    with emu():
        got = run(*inputs)
    assert all(torch.equal(t, fresh) for t, fresh in zip(inputs, new)), "no emulated launch took the late write"
    assert_close(got, expected, dtype=dtype, scale=4)


@emulated
@pytest.mark.parametrize("tokens", [1, 6, 33])
def test_fused_modules_into_column_slices(emu, pool, tokens):
    """q | k | v in one call, written into the middle columns of a wider tensor; SGMV and BGMV."""
    names, width = ["q_proj", "k_proj", "k_proj"], 4096 + 2 * 1024
    x, wide, slots = _lora_inputs(pool, tokens, 4096, width + 24, "skewed", seed=tokens)
    expected = wide.clone()
    bgmv(expected[:, 8:8 + width], x, pool, 0, names, slots)
    got = wide.clone()
    with emu():
        bgmv(got[:, 8:8 + width], x, pool, 0, names, slots)
    assert_close(got, expected, scale=4)
    order = torch.argsort(slots, stable=True)
    seg, counts = torch.unique_consecutive(slots[order], return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    expected = wide[order].clone()
    sgmv(expected[:, 8:8 + width], x[order], pool, 0, names, starts, seg)
    got = wide[order].clone()
    with emu():
        sgmv(got[:, 8:8 + width], x[order], pool, 0, names, starts, seg)
    assert_close(got, expected, scale=4)


@emulated
def test_bgmv_shrink_writes_all_of_v(emu, pool):
    """v comes from an uninitialised allocation: base rows and columns past a rank must still come out zero."""
    x, _, _ = _lora_inputs(pool, 7, 4096, 1, "uniform")
    slots = torch.tensor([0, -1, 3, 1, -1, 2, 2], dtype=torch.int32)
    args = (pool.arena, pool.page_table, pool.ranks, slots, 0, [pool.module_index("q_proj")], pool.page_size)
    expected = torch.ops.lorax_core.bgmv_shrink(x, *args)
    with emu():
        assert_close(torch.ops.lorax_core.bgmv_shrink(x, *args), expected, dtype=pool.config.dtype, scale=4)


@emulated
@pytest.mark.parametrize("count", [33, 70])
def test_sgmv_many_segments(emu, pool, count):
    """More segments than find_tile's warp walks in one step (32), empty and long ones (many tiles) among them."""
    lengths = [(0, 3, 1, 17, 2, 40, 5)[i % 7] for i in range(count)]  # segment 31, the last of a step: 17 tokens
    seg = torch.tensor([i % 5 - 1 for i in range(count)], dtype=torch.int32)  # segment 31: adapter 0
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x, y, _ = _lora_inputs(pool, sum(lengths), *MODULES["odd"], "uniform")
    expected = sgmv(y.clone(), x, pool, 0, "odd", starts, seg)
    with emu():
        assert_close(sgmv(y.clone(), x, pool, 0, "odd", starts, seg), expected, scale=4)


@emulated
@pytest.mark.parametrize("tokens", [1, 16, 17, 90])
def test_bgmv_many_slots(emu, tokens):
    """A pool of 40 adapters: BGMV's groups (one per slot, and one for base rows) span two steps of find_tile; the
    shrink and expand ops called one after the other as well as in one op."""
    pool = make_pool({"a": (64, 48)}, num_layers=1, budget_pages=9000, page_size=16, max_slots=40, max_rank=32)
    rng, gen = random.Random(tokens), torch.Generator().manual_seed(tokens)
    for i in range(40):
        pool.load(f"m{i}", random_adapter({"a": (64, 48)}, [rng.randint(1, 32)], num_layers=1, gen=gen), 1.0 + i / 8)
    assert not pool.evictions
    slots = torch.tensor([rng.randint(-1, 39) for _ in range(tokens)], dtype=torch.int32)
    x, y = torch.randn(tokens, 64), torch.randn(tokens, 48)
    common = (pool.arena, pool.page_table, pool.ranks)
    expected = bgmv(y.clone(), x, pool, 0, "a", slots)
    v = torch.ops.lorax_core.bgmv_shrink(x, *common, slots, 0, [0], pool.page_size)
    with emu():
        assert_close(bgmv(y.clone(), x, pool, 0, "a", slots), expected)
        got = y.clone()
        torch.ops.lorax_core.bgmv_expand(got, v, *common, pool.scales, slots, 0, [0], [0, 48], pool.page_size)
        assert_close(got, expected)


@emulated
def test_sgmv_clamps_bad_segments(emu, pool):
    """CUDA cannot check segments without waiting for the GPU, so its kernels clamp them (the CPU op raises): rows
    past the call's tokens are never touched (ASan would see it), an adapter outside the pool counts as none."""
    x, y, _ = _lora_inputs(pool, 9, *MODULES["odd"], "uniform")
    seg = torch.tensor([1, 3, 99, 0], dtype=torch.int32)
    expected = sgmv(y.clone(), x, pool, 0, "odd", torch.tensor([0, 4, 9], dtype=torch.int32), seg[:2])
    with emu():
        got = sgmv(y.clone(), x, pool, 0, "odd", torch.tensor([0, 4, 40, 50, 60], dtype=torch.int32), seg)
    assert_close(got, expected, scale=4)


SMALL = {"a": (64, 48), "b": (100, 52), "c": (256, 96)}
SMALL_RANKS = [[1], [7, 128], [16], [3, 64], [128, 2]]


@pytest.fixture(scope="module")
def small_pools():
    """Pools of small modules with ranks 1..128 mixed, tiny pages (an adapter's rows span many), per dtype."""
    pools = {}
    for dtype in FLOAT_DTYPES:
        gen = torch.Generator().manual_seed(1)
        pools[dtype] = make_pool(SMALL, num_layers=2, budget_pages=40000, page_size=16, dtype=dtype)
        for i, ranks in enumerate(SMALL_RANKS):
            pools[dtype].load(f"s{i}", random_adapter(SMALL, ranks, num_layers=2, gen=gen), 0.25 + i)
        assert not pools[dtype].evictions
    return pools


@emulated
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 24), min_size=1, max_size=6), data=st.data())
def test_random_layouts(emu, small_pools, lengths, data):
    """Random segment layouts (SGMV) and per-token adapters (BGMV), one module or a fused list, y a column slice."""
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    pool = small_pools[dtype]
    adapters = st.integers(-1, len(SMALL_RANKS) - 1)
    seg = torch.tensor(data.draw(st.lists(adapters, min_size=len(lengths), max_size=len(lengths))), dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.tensor(data.draw(st.lists(adapters, min_size=sum(lengths), max_size=sum(lengths))),
                         dtype=torch.int32)
    names = data.draw(st.sampled_from([["a"], ["b"], ["c"], ["c", "c"], ["a", "a", "a"]]))  # fused: one x
    layer, n_in, width = data.draw(st.integers(0, 1)), SMALL[names[0]][0], sum(SMALL[n][1] for n in names)
    x, wide = torch.randn(sum(lengths), n_in).to(dtype), torch.randn(sum(lengths), width + 3).to(dtype)
    for op, index in ((sgmv, (starts, seg)), (bgmv, (slots,))):
        expected, got = wide.clone(), wide.clone()
        op(expected[:, 3:], x, pool, layer, names, *index)
        with emu():
            op(got[:, 3:], x, pool, layer, names, *index)
        assert_close(got, expected, scale=4)


# ----------------------------------------------------------------------------------------------- attention

@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,group,window", [(128, 4, 0), (64, 1, 37), (256, 8, 0), (80, 2, 0), (128, 16, 5),
                                                   (32, 3, 0)])
def test_decode_attention(emu, dtype, head_dim, group, window):
    """Split kernel (16-byte loads: 8, 16 or 32 threads per position) with several splits, and general kernel
    (head sizes 16-byte loads do not tile, GQA groups over 8)."""
    k, v, tables, lens = random_cache([5, 300, 0, 17, 129], 16, 2, head_dim, dtype, seed=head_dim)  # 0: padding
    q = torch.randn(5, 2 * group, head_dim).to(dtype)
    expected = paged_attention_decode(q, k, v, tables, lens, head_dim**-0.5, window)
    with emu():
        assert_close(paged_attention_decode(q, k, v, tables, lens, head_dim**-0.5, window), expected)
    _check_counters(emu, q, k, v, tables, lens, head_dim**-0.5, window)


def _check_counters(emu, q, k, v, tables, lens, scale, window):
    """With counters, the splits merged in the last CTA to finish: the two-kernel result bit for bit, and the
    counters left zero (shared by every layer, they must be)."""
    counters = torch.zeros(q.shape[0] * k.shape[2] + 3, dtype=torch.int32)
    with emu():
        two_kernels = paged_attention_decode(q, k, v, tables, lens, scale, window)
        for _ in range(2):
            assert torch.equal(paged_attention_decode(q, k, v, tables, lens, scale, window, counters), two_kernels)
            assert not counters.any()


@emulated
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=4).filter(any), block_size=st.sampled_from([1, 4, 16]),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3, 8, 9]),
       head_dim=st.sampled_from([32, 64, 80, 128]), window=st.sampled_from([0, 1, 7, 64]),
       dtype=st.sampled_from(FLOAT_DTYPES))
def test_decode_attention_random_shapes(emu, lengths, block_size, kv_heads, group, head_dim, window, dtype):
    k, v, tables, lens = random_cache(lengths, block_size, kv_heads, head_dim, dtype)
    q = torch.randn(len(lengths), kv_heads * group, head_dim).to(dtype)
    expected = paged_attention_decode(q, k, v, tables, lens, head_dim**-0.5, window)
    with emu():
        assert_close(paged_attention_decode(q, k, v, tables, lens, head_dim**-0.5, window), expected)
    _check_counters(emu, q, k, v, tables, lens, head_dim**-0.5, window)


@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_SHRINK_CASES, ids=str)
def test_decode_attention_sgmv_shrink(emu, dtype, case):
    """Decode attention with o's LoRA shrink in the split kernel (the CTA that writes a (row, kv head)'s output
    shrinks it, the last of the row's kv heads sums), against the emulated two ops: rows of one split and of several,
    padding rows, rows without an adapter or whose adapter has no o_proj, mixed ranks; pages of 64 elements and of
    16 bytes with a sliding window. head_dim 80 takes the general kernel and the two ops. The fused op runs no
    sgmv_shrink."""
    def run(f):
        with emu():
            return f()

    check_device_attention_shrink(case, dtype, "cpu", run)
    check_device_attention_shrink(case, dtype, "cpu", run, page_size=16 // torch.empty(0, dtype=dtype).element_size(),
                                  window=33)
    if case is ATTENTION_SHRINK_CASES[0]:
        lengths, kv_heads, group, head_dim, rows = case
        args, _ = attention_shrink_case(lengths, kv_heads, group, head_dim, dtype, rows)
        counters = torch.zeros(len(lengths) * (kv_heads + 1), dtype=torch.int32)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(lambda: paged_attention_decode_sgmv_shrink(**args, counters=counters))
        names = {e.name for e in prof.events()}
        assert "lorax_emu::paged_attention_decode_sgmv_shrink" in names and "lorax_emu::sgmv_shrink" not in names


@emulated
def test_decode_attention_layer_views_and_one_split(emu):
    """Caches as views of one [layers, 2, ...] tensor (how the engine holds them), and a batch big enough for
    one split per CTA."""
    cache = torch.randn(2, 2, 40, 16, 2, 128).bfloat16()
    tables = torch.randperm(40)[:36].view(36, 1).int()
    lens = torch.randint(1, 17, (36,)).int()
    q = torch.randn(36, 8, 128).bfloat16()
    expected = paged_attention_decode(q, cache[1, 0], cache[1, 1], tables, lens, 0.088)
    with emu():
        assert_close(paged_attention_decode(q, cache[1, 0], cache[1, 1], tables, lens, 0.088), expected)


@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kv_cache_write_strided_rows(emu, dtype):
    """k and v as column slices of a qkv output (strided rows); slot -1 skips a token."""
    qkv = torch.randn(9, (8 + 2 + 2) * 64).to(dtype)
    k, v = qkv[:, 512:640].view(9, 2, 64), qkv[:, 640:].view(9, 2, 64)
    slots = torch.tensor([3, 0, -1, 17, 5, 30, 31, 8, 9])
    caches = [torch.randn(4, 8, 2, 64).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kv_cache_write(*expected, k, v, slots)
    with emu():
        kv_cache_write(*caches, k, v, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


# ---------------------------------------------------------------------------------------------- layer ops

def _needs(emu, op):
    if op not in emu.ops:
        pytest.skip(f"{op} has no CUDA kernel in this build")


@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 4096), (5, 100), (3, 14336)])
def test_norms_and_silu_mul(emu, dtype, rows, cols):
    from lorax_core.ops import add_rms_norm, rms_norm, silu_mul

    for op in ("rms_norm", "add_rms_norm", "silu_mul"):
        _needs(emu, op)
    wide = torch.randn(rows, 2 * cols + 8).to(dtype)
    x, residual = wide[:, :cols], wide[:, cols + 8:]  # strided rows
    w = (1 + 0.1 * torch.randn(cols)).to(dtype)
    expected = rms_norm(x, w, 1e-5), add_rms_norm(x, residual, w, 1e-5), silu_mul(x, residual)
    with emu():
        got = rms_norm(x, w, 1e-5), add_rms_norm(x, residual, w, 1e-5), silu_mul(x, residual)
    assert_close(got[0], expected[0])
    assert_close(got[1][0], expected[1][0])
    assert torch.equal(got[1][1], expected[1][1])  # the residual sum rounds once, as on the CPU
    assert_close(got[2], expected[2])


@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 128), (4, 4, 64), (3, 1, 80)])
def test_rotary_embedding_in_place(emu, dtype, heads, kv_heads, head_dim):
    """On the q and k column slices of a qkv output, as the model calls it: bit-identical to the CPU kernel."""
    from lorax_core.ops import rotary_embedding

    _needs(emu, "rotary_embedding")
    tokens, positions = 7, torch.tensor([0, 5, 9, 2, 31, 31, 17])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.arange(32).float()[:, None] * torch.linspace(0.01, 1, head_dim // 2)
    cos, sin = [f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin)]
    expected, got = qkv.clone(), qkv.clone()
    rotary_embedding(*qkv_views(expected, heads, kv_heads, head_dim)[:2], cos, sin, positions)
    with emu():
        rotary_embedding(*qkv_views(got, heads, kv_heads, head_dim)[:2], cos, sin, positions)
    assert torch.equal(got, expected)


@emulated
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,tokens", [(8, 2, 128, 7), (4, 4, 64, 1), (3, 1, 80, 9)])
def test_rotary_kv_cache_write(emu, dtype, heads, kv_heads, head_dim, tokens):
    """The fused rotary + KV cache write on q, k, v views of a qkv output, some tokens without a slot: q, k and
    both caches bit-identical to the CPU op."""
    from lorax_core.ops import rotary_kv_cache_write

    _needs(emu, "rotary_kv_cache_write")
    qkv, caches, cos, sin, positions, slots = rotary_cache_inputs(tokens, heads, kv_heads, head_dim, dtype)
    got = [t.clone() for t in (qkv, *caches)]
    rotary_kv_cache_write(*qkv_views(qkv, heads, kv_heads, head_dim), cos, sin, positions, *caches, slots)
    with emu():
        rotary_kv_cache_write(*qkv_views(got[0], heads, kv_heads, head_dim), cos, sin, positions, got[1], got[2],
                              slots)
    for actual, expected in zip(got, (qkv, *caches)):
        assert torch.equal(actual, expected)


# ------------------------------------------------------------------------------------------------------ NF4

@emulated
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", [(33, 17), (7,), (64, 160)])
def test_nf4_quantize_and_dequantize(emu, double_quant, blocksize, shape):
    """Codes and dequantized values bit-identical to the CPU kernels; the double-quantized absmax within an
    ulp (its offset is a mean, summed in another order)."""
    x = torch.randn(shape) * 3
    expected = NF4Weight.quantize(x, blocksize, double_quant)
    with emu():
        got = NF4Weight.quantize(x, blocksize, double_quant)
    assert torch.equal(got.codes, expected.codes)
    torch.testing.assert_close(got.absmax_fp32(), expected.absmax_fp32(), rtol=1e-5, atol=1e-6)
    for dtype in FLOAT_DTYPES:
        with emu():
            values = expected.dequantize(dtype)
        assert torch.equal(values, expected.dequantize(dtype))


def _check_nf4_linear(emu, n, k, m, dtype, blocksize, double_quant=True, bias=False):
    w = NF4Weight.quantize(torch.randn(n, k), blocksize, double_quant)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    with emu():
        y = nf4_linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_nf4_linear(y, x, w, b)


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k,blocksize", [(256, 512, 64), (48, 384, 32), (16, 128, 256), (1024, 4096, 64)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 17, 33])
def test_nf4_linear(emu, gemv_staging, dtype, n, k, blocksize, m):
    """Every path of nf4_linear: the GEMV (up to 8 rows, 1, 2, 4 or 8 in a kernel), the tensor-core GEMM with its
    split-K sum (up to 32 rows) and dequantize + matmul (more rows)."""
    _check_nf4_linear(emu, n, k, m, dtype, blocksize, bias=m % 2 == 1)


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_gemv_rounds_the_exact_product(emu, gemv_staging, dtype):
    """The GEMV (up to NF4_GEMV_MAX_ROWS rows) multiplies by the NF4 values in x's dtype and scales in fp32: each
    result is x @ W'.T in fp32 rounded once, W' = nf4_gemv_weight. (The GEMM, for more rows, rounds each scaled
    weight to x's dtype instead.)"""
    w = NF4Weight.quantize(torch.randn(64, 4096), 64, True)
    for m in range(1, NF4_GEMV_MAX_ROWS + 1):
        x = torch.randn(m, 4096).to(dtype)
        with emu():
            y = nf4_linear(x, w)
        assert_rounds_exact(y, x.float() @ nf4_gemv_weight(w, dtype).T)


@emulated
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_gemv_staged_equals_registers(emu, double_quant):
    """The GEMV's two main loops give the same outputs bit for bit (as tests/test_nf4_cuda.py checks on a GPU):
    k = 2336 is two whole stages and one of 288 elements, whose last step is partly past k."""
    w = NF4Weight.quantize(torch.randn(40, 2336), 64, double_quant)
    was = emu.module.set_nf4_gemv_staging(False)
    try:
        for m in (1, 2, 3, 8):
            x = torch.randn(m, 2336).to(torch.bfloat16)
            with emu():
                registers = nf4_linear(x, w)
                emu.module.set_nf4_gemv_staging(True)
                staged = nf4_linear(x, w)
                emu.module.set_nf4_gemv_staging(False)
            assert torch.equal(staged, registers), f"m = {m}"
    finally:
        emu.module.set_nf4_gemv_staging(was)


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_nf4_fused_parts_keep_their_offsets(emu, gemv_staging, dtype, m):
    """A fused weight whose parts keep their double quantization, each with its own offset: the GEMV's two loops, the
    GEMM and the dequantize kernel decode each block's absmax to what the fp32-absmax fusion holds (bit for bit),
    also where a tile pairs rows of two parts (SwiGLU's gate and up)."""
    def run(f):
        with emu():
            return f()

    check_device_fused_parts(m, dtype, "cpu", run)


@emulated
@pytest.mark.parametrize("m", [1, 3, 8], ids=str)
@pytest.mark.parametrize("k", [416, 2240], ids=str)
def test_nf4_gemv_several_tiles_per_cta(emu, gemv_staging, k, m):
    """More 16-row tiles than the GEMV's grid (3 CTAs on each of the 132 SMs at one row of x, 2 with more): some CTAs
    take a second tile, their warps' loads run on from one tile into the next, and k ends inside a step (lanes past
    it load a chunk again)."""
    _check_nf4_linear(emu, 16 * 396 + 40, k, m, torch.bfloat16, 64, bias=True)


@emulated
@pytest.mark.parametrize("case", NF4_SGMV_CASES, ids=nf4_sgmv_case_id)
def test_nf4_linear_sgmv_several_tiles_per_cta(emu, gemv_staging, case):
    """The GEMV's LoRA and SwiGLU epilogue where CTAs take more than one tile (q | k | v of 6656 rows; gate | up of
    2 x 3204, 401 tiles of 8 outputs), k = 416."""
    def run(f):
        with emu():
            return f()

    modules = {"q_proj": (416, 4096), "k_proj": (416, 1280), "v_proj": (416, 1280), "gate_proj": (416, 3204),
               "up_proj": (416, 3204)}
    check_nf4_sgmv(case, torch.bfloat16, "cpu", run, modules=modules)


@emulated
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", QKV_CASES, ids=nf4_sgmv_case_id)
def test_nf4_linear_sgmv_rotary(emu, gemv_staging, dtype, case, head_dim):
    """q | k | v with rotary and the KV cache write in the GEMV's epilogue (1 to 8 rows; 9: the ops), bit for bit
    the emulated nf4_linear_sgmv then rotary_kv_cache_write: rows without a slot, rows without an adapter."""
    def run(f):
        with emu():
            return f()

    check_device_rotary(case, head_dim, dtype, "cpu", run)


@emulated
def test_nf4_linear_sgmv_rotary_odd_shapes(emu, gemv_staging):
    """head_dim 48 (not a power of two: the ops one after the other), and 32 q + 2 x 10 kv heads of 128 (416 tiles
    of 8 pairs: some CTAs take two)."""
    def run(f):
        with emu():
            return f()

    check_device_rotary(QKV_CASES[0], 48, torch.bfloat16, "cpu", run, modules=QKV_ODD)
    big = {"q_proj": (416, 4096), "k_proj": (416, 1280), "v_proj": (416, 1280)}
    for case in (QKV_CASES[0], QKV_CASES[-1]):
        check_device_rotary(case, 128, torch.bfloat16, "cpu", run, modules=big)


@emulated
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), chunks=st.integers(1, 80), m=st.integers(1, 40),
       blocksize=st.sampled_from([32, 64, 128, 1024]), double_quant=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), staged=st.booleans())
def test_nf4_linear_random_shapes(emu, n, chunks, m, blocksize, double_quant, bias, dtype, staged):
    """Odd numbers of output features and k of any multiple of 32 (the kernels' tails; the staged GEMV's last
    stage cut short, absmax blocks across stages, the absmax's last word past its end), 1..40 rows."""
    was = emu.module.set_nf4_gemv_staging(staged)
    try:
        _check_nf4_linear(emu, n, 32 * chunks, m, dtype, blocksize, double_quant, bias)
    finally:
        emu.module.set_nf4_gemv_staging(was)


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", NF4_SGMV_CASES, ids=nf4_sgmv_case_id)
def test_nf4_linear_sgmv(emu, gemv_staging, dtype, case):
    """The GEMV with the LoRA expand and silu_mul in its epilogue (one row), and the ops one after the other (more),
    emulated: k of 256 (most lanes have no chunk: their LoRA share is taken before the loop), 2048 and 4096 (2 and 4
    warps split k: these few outputs are far from filling a GPU)."""
    def run(f):
        with emu():
            return f()

    check_nf4_sgmv(case, dtype, "cpu", run)
    for k in (2048, 4096):
        check_nf4_sgmv(case, dtype, "cpu", run, modules={n: (k, out) for n, (_, out) in NF4_SGMV_MODULES.items()})


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MLP_CASES, ids=mlp_case_id)
def test_nf4_linear_sgmv_silu_shrink(emu, gemv_staging, dtype, case):
    """gate | up with SwiGLU and down's LoRA shrink in the GEMV's epilogue (up to 8 rows; 9: the ops), against the
    emulated ops: the CTAs' shares and the last CTA's sum. Also where CTAs take several tiles and the last tile is
    cut short (2 x 3204 outputs: 401 tiles of 8 over 396 CTAs, the last with 4), with k = 416. Given x's shrink (as
    the norm before hands it over), one row runs no sgmv_shrink: the op is one kernel."""
    def run(f):
        with emu():
            return f()

    check_device_silu_shrink(case, dtype, "cpu", run)
    if case[0] == 1 and dtype == torch.bfloat16:
        big = {"gate_proj": (416, 3204), "up_proj": (416, 3204), "down_proj": (3204, 416)}
        check_device_silu_shrink(case, dtype, "cpu", run, modules=big)
        args = silu_shrink_case(case, dtype)
        pool = args["pool"]
        v = torch.ops.lorax_core.sgmv_shrink(args["x"], pool.arena, pool.page_table, pool.ranks, args["seg_starts"],
                                             args["seg_slots"], args["layer"], [0, 1], pool.page_size)
        counters = torch.zeros(1, dtype=torch.int32)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(lambda: nf4_linear_sgmv_silu_shrink(**{**args, "v": v}, next_modules="down_proj", counters=counters))
        names = {e.name for e in prof.events()}
        assert "lorax_emu::nf4_linear_sgmv_silu_shrink" in names and "lorax_emu::sgmv_shrink" not in names


@emulated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", NF4_SGMV_CASES, ids=nf4_sgmv_case_id)
def test_add_rms_norm_sgmv_shrink(emu, dtype, case):
    """The norm with the LoRA shrink of its output in one kernel (one row), and the two ops (more), emulated: rows of
    256 (fewer elements than threads: most have none) and 4096, and one of 4100 (not in 16-byte pieces)."""
    def run(f):
        with emu():
            return f()

    for k in (256, 4096, 4100):
        check_norm_shrink(case, dtype, "cpu", run, modules={n: (k, out) for n, (_, out) in NF4_SGMV_MODULES.items()})


# ------------------------------------------------------------------------------------------- the whole model

@emulated
@pytest.mark.parametrize("kind", ["mistral"])  # its sliding window (8) is shorter than most prompts
def test_model_on_emulated_kernels_matches_peft(emu, kind, tmp_path):
    """The engine's logits with every emulated kernel in the model (LoRA, KV cache write, decode attention, the
    layer ops where built) equal transformers + PEFT row by row: prefill then decode steps of a mixed batch.
    head_dim 32 in fp32 takes the split attention kernel."""
    from model_helpers import hf_logits, hf_peft_model, save_adapters, save_model

    from lorax_core import LLM, SamplingParams

    base = save_model(tmp_path / "base", kind, tokenizer=False, hidden_size=128)
    adapters = save_adapters(base, tmp_path)
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_active_adapters=4, adapter_loader_threads=0)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    counters = torch.zeros(8 * llm.model.config.num_kv_heads, dtype=torch.int32)  # as the runner sets them on a GPU
    for layer in llm.model.layers:
        layer.attn.counters = counters
    hf = hf_peft_model(base, adapters)
    rows = ["r4_qv", None, "r8_all", "r16_rslora", "r8_pattern"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(3, 20))] for _ in rows]
    seqs = [llm.add_request(p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), a)
            for p, a in zip(prompts, rows)]
    for step in range(3):
        batch = llm.scheduler.schedule()
        with emu():
            logits = llm.runner.run(batch)
        for seq, row in zip(batch, logits):
            expected = hf_logits(hf, seq.token_ids, seq.adapter)[-1]
            where = f"{seq.adapter}, step {step}"
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4, msg=lambda m, where=where: f"{where}: {m}")
        assert not counters.any()
        for seq, row in zip(batch, logits):
            seq.num_computed_tokens, seq.chunk = len(seq), 0
            seq.append(int(row.argmax()))
    for seq in seqs:
        llm.abort(seq)


@emulated
@pytest.mark.parametrize("rows", [["r8_all", None, "r16_rslora"], ["r16_rslora"], [None]], ids=str)
def test_nf4_bf16_model_on_emulated_kernels(emu, tmp_path, rows):
    """The NF4 engine in bf16 as it runs on a GPU, every kernel emulated (the tensor-core GEMM for prompt rows; the
    GEMV for up to 8 decode rows, with the LoRA expand and SwiGLU (and down's LoRA shrink) in its epilogue; LoRA,
    attention, the layer ops), against the fp32 engine on the same NF4 codes: as close to it as the bf16 engine on
    the CPU kernels is, step by step. The GEMV rounds the NF4 values to bf16 where the CPU kernels round each scaled
    weight, so the two err differently by as much: the mean error may exceed the CPU kernels' by 10%, the largest by
    25%."""
    from model_helpers import save_adapters, save_model

    from lorax_core import LLM, SamplingParams

    base = save_model(tmp_path / "base", "llama", tokenizer=False, hidden_size=128, intermediate_size=256)
    adapters = save_adapters(base, tmp_path)
    llms = {}
    for dtype in ("bfloat16", "float32"):
        llms[dtype] = LLM(base, dtype=dtype, device="cpu", quantize="nf4", kv_block_size=4, max_active_adapters=4,
                          adapter_loader_threads=0)
        for name, path in adapters.items():
            llms[dtype].load_adapter(name, path)
    counters = torch.zeros(8 * (llms["bfloat16"].model.config.num_kv_heads + 1), dtype=torch.int32)  # as the runner
    for layer in llms["bfloat16"].model.layers:  # sets them on a GPU: attention merges its splits and does o's LoRA
        layer.attn.counters = layer.mlp.counters = counters  # shrink, gate | up's GEMV down's, in their last CTAs
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (9, 3, 14)[:len(rows)]]  # prompt rows: the GEMM
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for llm in llms.values():
        for prompt, adapter in zip(prompts, rows):
            llm.add_request(prompt, params, adapter)
    for step in range(4):  # then one decode row per sequence and step
        batches = {dtype: llm.scheduler.schedule() for dtype, llm in llms.items()}
        exact = llms["float32"].runner.run(batches["float32"])
        with emu():
            emulated = llms["bfloat16"].runner.run(batches["bfloat16"])
        assert not counters.any()
        cpu = llms["bfloat16"].runner.run(batches["bfloat16"])  # the same KV cache slots, rewritten
        err_emulated, err_cpu = (emulated - exact).abs(), (cpu - exact).abs()
        assert err_emulated.mean() <= 1.1 * err_cpu.mean() and err_emulated.max() <= 1.25 * err_cpu.max(), (
            f"step {step}: mean / max {err_emulated.mean()} / {err_emulated.max()} from fp32, the CPU kernels "
            f"{err_cpu.mean()} / {err_cpu.max()}")
        for batch in batches.values():
            for seq, row in zip(batch, exact):
                seq.num_computed_tokens, seq.chunk = len(seq), 0
                seq.append(int(row.argmax()))
