"""SGMV / BGMV over the paged pool (CPU) against the dense fp32 reference, many layouts and popularity patterns."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from lora_helpers import POPULARITY, make_pool, random_adapter, token_slots
from lorax_core.ops import bgmv, sgmv
from lorax_core.ops import reference as ref

MODULES = {"q_proj": (64, 64), "k_proj": (64, 16), "down_proj": (160, 64)}
RANKS = [[1], [4], [8, 16], [128], [3, 64]]


@pytest.fixture(scope="module")
def loaded():
    """A pool with five adapters of mixed ranks (1..128) and their dense weights."""
    gen = torch.Generator().manual_seed(1)
    pool = make_pool(MODULES)
    adapters = {}
    for i, ranks in enumerate(RANKS):
        weights = random_adapter(MODULES, ranks, gen=gen)
        slot = pool.load(f"a{i}", weights, scale=0.5 + i)
        adapters[slot] = (weights, 0.5 + i)
    return pool, adapters


def reference(y, x, slots, adapters, layer, module):
    weights = {s: w[(layer, module)] for s, (w, _) in adapters.items() if (layer, module) in w}
    scales = {s: sc for s, (_, sc) in adapters.items()}
    return ref.lora_delta(y, x, [s if s in weights else -1 for s in slots], weights, scales)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_bgmv_matches_reference(loaded, popularity, module, num_tokens):
    pool, adapters = loaded
    n_in, n_out = MODULES[module]
    slots = token_slots(num_tokens, sorted(adapters), popularity, base_every=3)
    x, y = torch.randn(num_tokens, n_in), torch.randn(num_tokens, n_out)
    expected = reference(y, x, slots, adapters, 1, module)
    bgmv(y, x, pool, 1, module, torch.tensor(slots, dtype=torch.int32))
    assert_close(y, expected)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sgmv_matches_reference_random_segments(loaded, data):
    pool, adapters = loaded
    module = data.draw(st.sampled_from(list(MODULES)))
    lengths = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=8))
    seg_slots = data.draw(st.lists(st.sampled_from([-1, *sorted(adapters)]), min_size=len(lengths),
                                   max_size=len(lengths)))
    n_in, n_out = MODULES[module]
    tokens = sum(lengths)
    slots = [s for s, n in zip(seg_slots, lengths) for _ in range(n)]
    x, y = torch.randn(tokens, n_in), torch.randn(tokens, n_out)
    expected = reference(y, x, slots, adapters, 0, module)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    sgmv(y, x, pool, 0, module, starts, torch.tensor(seg_slots, dtype=torch.int32))
    assert_close(y, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pool(dtype):
    pool = make_pool(MODULES, dtype=dtype)
    weights = random_adapter(MODULES, [8])
    slot = pool.load("a", weights, 2.0)
    x, y = torch.randn(5, 160).to(dtype), torch.randn(5, 64).to(dtype)
    half_weights = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in weights.items()}
    expected = reference(y, x, [slot] * 5, {slot: (half_weights, 2.0)}, 0, "down_proj")
    bgmv(y, x, pool, 0, "down_proj", torch.full((5,), slot, dtype=torch.int32))
    assert_close(y, expected, scale=2)


def test_expand_into_a_column_slice(loaded):
    """y may be a column slice of a fused output (q | k | v): only its columns change, as with a contiguous y."""
    pool, adapters = loaded
    slots = torch.tensor(token_slots(9, sorted(adapters), "uniform", base_every=4), dtype=torch.int32)
    x, fused = torch.randn(9, 160), torch.randn(9, 100)
    expected = fused.clone()
    expected[:, 20:84] = bgmv(fused[:, 20:84].clone(), x, pool, 1, "down_proj", slots)
    bgmv(fused[:, 20:84], x, pool, 1, "down_proj", slots)
    assert torch.equal(fused, expected)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_fused_modules_equal_one_call_per_module(loaded, popularity, num_tokens):
    """A fused projection (q | k in one y) in one call: each module's columns get exactly what a call of its own
    gives, for BGMV and SGMV, with an adapter that targets only q among the others."""
    pool, adapters = loaded
    only_q = pool.load("q_only", random_adapter(MODULES, [8], only={"q_proj"}), 1.5)
    slots = token_slots(num_tokens, [*sorted(adapters), only_q], popularity, base_every=4)
    x, fused = torch.randn(num_tokens, 64), torch.randn(num_tokens, 80)
    expected = fused.clone()
    indices = torch.tensor(slots, dtype=torch.int32)
    bgmv(expected[:, :64], x, pool, 1, "q_proj", indices)
    bgmv(expected[:, 64:], x, pool, 1, "k_proj", indices)
    got = bgmv(fused.clone(), x, pool, 1, ["q_proj", "k_proj"], indices)
    assert torch.equal(got, expected)
    starts = torch.arange(num_tokens + 1, dtype=torch.int32)  # a segment per token
    assert torch.equal(sgmv(fused.clone(), x, pool, 1, ["q_proj", "k_proj"], starts, indices), expected)
    pool.evict("q_only")


def test_adapter_of_some_modules_leaves_others_alone():
    pool = make_pool(MODULES)
    slot = pool.load("q_only", random_adapter(MODULES, [8], only={"q_proj"}), 1.0)
    x, y = torch.randn(3, 160), torch.randn(3, 64)
    before = y.clone()
    bgmv(y, x, pool, 0, "down_proj", torch.full((3,), slot, dtype=torch.int32))
    assert torch.equal(y, before)


def test_pool_reads_back_what_was_loaded(loaded):
    pool, adapters = loaded
    for i, (slot, (weights, scale)) in enumerate(sorted(adapters.items())):
        assert pool.slot(f"a{i}") == slot and pool.scales[slot].item() == scale
        for (layer, module), (a, b) in weights.items():
            da, db = pool.dense(f"a{i}", layer, module)
            assert torch.equal(da, a) and torch.equal(db, b)


def test_bad_inputs_get_clear_errors(loaded):
    pool, adapters = loaded
    slots = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="unsupported shape: in features 4096 exceed the pool's widest row"):
        torch.ops.lorax_core.bgmv_shrink(torch.randn(2, 4096), pool.arena, pool.page_table, pool.ranks, slots, 0, [0],
                                         pool.page_size)
    with pytest.raises(RuntimeError, match="activations are BFloat16, the adapter pool holds Float"):
        bgmv(torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(2, 64, dtype=torch.bfloat16), pool, 0, "q_proj",
             slots)
    with pytest.raises(ValueError, match="module 'o_proj' is not in this pool"):
        bgmv(torch.randn(2, 64), torch.randn(2, 64), pool, 0, "o_proj", slots)
    with pytest.raises(ValueError, match=r"y has 64 columns; the outputs of \['q_proj', 'k_proj'\] take 80"):
        bgmv(torch.randn(2, 64), torch.randn(2, 64), pool, 0, ["q_proj", "k_proj"], slots)
    common = (pool.arena, pool.page_table, pool.ranks)
    v = torch.ops.lorax_core.bgmv_shrink(torch.randn(2, 64), *common, slots, 0, [0, 1], pool.page_size)
    with pytest.raises(RuntimeError, match="columns must not decrease"):
        torch.ops.lorax_core.bgmv_expand(torch.randn(2, 80), v, *common, pool.scales, slots, 0, [0, 1], [0, 64, 16],
                                         pool.page_size)
    with pytest.raises(RuntimeError, match="columns must hold 3 offsets"):
        torch.ops.lorax_core.bgmv_expand(torch.randn(2, 80), v, *common, pool.scales, slots, 0, [0, 1], [0, 64],
                                         pool.page_size)
    with pytest.raises(RuntimeError, match="1 to 4 modules per call, got 5"):
        torch.ops.lorax_core.bgmv_shrink(torch.randn(2, 64), *common, slots, 0, [0] * 5, pool.page_size)


@pytest.mark.parametrize("num_tokens", [1, 11])
def test_one_op_equals_shrink_then_expand(loaded, num_tokens):
    """sgmv / bgmv (what the wrappers call) are exactly the shrink op followed by the expand op."""
    pool, adapters = loaded
    slots = torch.tensor(token_slots(num_tokens, sorted(adapters), "skewed", base_every=4), dtype=torch.int32)
    starts = torch.tensor([0, num_tokens // 2, num_tokens], dtype=torch.int32)
    seg = torch.tensor([sorted(adapters)[2], -1], dtype=torch.int32)
    x, y = torch.randn(num_tokens, 64), torch.randn(num_tokens, 80)  # q_proj | k_proj
    common, lora = (pool.arena, pool.page_table, pool.ranks), torch.ops.lorax_core
    tail = (1, [0, 1], [0, 64, 80], pool.page_size)
    for one, shrink, expand, index in (("bgmv", lora.bgmv_shrink, lora.bgmv_expand, (slots,)),
                                       ("sgmv", lora.sgmv_shrink, lora.sgmv_expand, (starts, seg))):
        expected = y.clone()
        v = shrink(x, *common, *index, 1, [0, 1], pool.page_size)
        expand(expected, v, *common, pool.scales, *index, *tail)
        got = y.clone()
        getattr(lora, one)(got, x, *common, pool.scales, *index, *tail)
        assert torch.equal(got, expected), one
    three = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"bgmv: y must have x's 3 rows, got \[2, 80\]"):
        lora.bgmv(torch.randn(2, 80), torch.randn(3, 64), *common, pool.scales, three, *tail)


def test_bad_segments_get_clear_errors(loaded):
    """Segments come from the caller: past the rows, falling, or with an adapter outside the pool, the CPU op says
    which (CUDA clamps them instead: tests/test_cuda_emulated.py)."""
    pool, _ = loaded
    x, y = torch.randn(8, 64), torch.randn(8, 64)
    cases = [([0, 5, 9], [0, 1], r"at most the 8 tokens .*seg_starts\[2\] is 9 after 5"),
             ([0, 5, 3], [0, 1], r"seg_starts\[2\] is 3 after 5"),
             ([-1, 8], [0], r"seg_starts\[0\] is -1"),
             ([0, 4, 8], [0, 16], r"segment 1 has adapter slot 16; the pool has 16 slots \(-1: no adapter\)"),
             ([0, 8], [-2], r"segment 0 has adapter slot -2")]
    for starts, seg, message in cases:
        with pytest.raises(RuntimeError, match=message):
            sgmv(y, x, pool, 0, "q_proj", torch.tensor(starts, dtype=torch.int32), torch.tensor(seg, dtype=torch.int32))


def test_opcheck(loaded):
    pool, adapters = loaded
    x, y = torch.randn(6, 64), torch.randn(6, 64)
    slots = torch.tensor(token_slots(6, sorted(adapters), "uniform", base_every=4), dtype=torch.int32)
    starts, seg = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([1, -1], dtype=torch.int32)
    common = (pool.arena, pool.page_table, pool.ranks)
    v = torch.ops.lorax_core.bgmv_shrink(x, *common, slots, 0, [0], pool.page_size)
    qk = torch.randn(6, 80)  # q_proj | k_proj
    v2 = torch.ops.lorax_core.bgmv_shrink(x, *common, slots, 0, [0, 1], pool.page_size)
    cases = [
        ("sgmv_shrink", (x, *common, starts, seg, 0, [0], pool.page_size)),
        ("bgmv_shrink", (x, *common, slots, 0, [0, 1], pool.page_size)),
        ("sgmv_expand", (y, v, *common, pool.scales, starts, seg, 0, [0], [0, 64], pool.page_size)),
        ("bgmv_expand", (y, v, *common, pool.scales, slots, 0, [0], [0, 64], pool.page_size)),
        ("sgmv_expand", (qk, v2, *common, pool.scales, starts, seg, 0, [0, 1], [0, 64, 80], pool.page_size)),
        ("sgmv", (qk, x, *common, pool.scales, starts, seg, 0, [0, 1], [0, 64, 80], pool.page_size)),
        ("bgmv", (y, x, *common, pool.scales, slots, 0, [0], [0, 64], pool.page_size)),
    ]
    for op, args in cases:
        torch.library.opcheck(getattr(torch.ops.lorax_core, op).default, args)
