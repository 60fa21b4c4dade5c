"""Paged KV cache ops (kv_cache_write, paged_attention_decode, and paged_attention_decode_sgmv_shrink: with
o_proj's LoRA shrink of the output): CPU op == reference, CUDA op == CPU op."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FLOAT_DTYPES, assert_close
from lorax_core.ops import kv_cache_write, paged_attention_decode, paged_attention_decode_sgmv_shrink, reference


def random_cache(lengths, block_size, kv_heads, head_dim, dtype, device="cpu", seed=0):
    """Caches filled with random values and a block table of shuffled (non-contiguous) blocks per sequence."""
    rng = random.Random(seed)
    per_seq = [(n + block_size - 1) // block_size for n in lengths]
    blocks = sum(per_seq) + 3
    ids = list(range(blocks))
    rng.shuffle(ids)
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32)
    for b, n in enumerate(per_seq):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    k = torch.randn(blocks, block_size, kv_heads, head_dim).to(dtype)
    v = torch.randn(blocks, block_size, kv_heads, head_dim).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return k.to(device), v.to(device), tables.to(device), lens.to(device)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=5).filter(any), block_size=st.sampled_from([1, 4, 16]),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4]), head_dim=st.sampled_from([8, 16, 64]),
       window=st.sampled_from([0, 1, 5, 32]))
def test_decode_attention_equals_reference(lengths, block_size, kv_heads, group, head_dim, window):
    k, v, tables, lens = random_cache(lengths, block_size, kv_heads, head_dim, torch.float32)
    q = torch.randn(len(lengths), kv_heads * group, head_dim)
    scale = head_dim**-0.5
    out = paged_attention_decode(q, k, v, tables, lens, scale, window)
    assert_close(out, reference.paged_attention_decode(q, k, v, tables, lens, scale, window))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_decode_attention_dtypes(dtype):
    k, v, tables, lens = random_cache([5, 40, 17], 16, 2, 128, dtype)
    q = torch.randn(3, 8, 128).to(dtype)
    out = paged_attention_decode(q, k, v, tables, lens, 128**-0.5)
    assert out.dtype == dtype
    assert_close(out, reference.paged_attention_decode(q, k, v, tables, lens, 128**-0.5))


def test_decode_attention_counters_are_checked_and_unused_on_the_cpu():
    k, v, tables, lens = random_cache([5, 40], 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    out = paged_attention_decode(q, k, v, tables, lens, 0.25)
    counters = torch.zeros(4, dtype=torch.int32)
    assert torch.equal(paged_attention_decode(q, k, v, tables, lens, 0.25, counters=counters), out)
    with pytest.raises(RuntimeError, match="counters must be int32, contiguous, at least batch x kv_heads = 4"):
        paged_attention_decode(q, k, v, tables, lens, 0.25, counters=counters[:3])
    with pytest.raises(RuntimeError, match="counters must be int32"):
        paged_attention_decode(q, k, v, tables, lens, 0.25, counters=counters.long())
    torch.library.opcheck(torch.ops.lorax_core.paged_attention_decode.default,
                          (q, k, v, tables, lens, 0.25, 0, counters))


def test_decode_attention_equals_sdpa():
    """Against torch's attention on the same keys laid out contiguously (GQA expanded by hand)."""
    k, v, tables, lens = random_cache([23], 4, 2, 16, torch.float32)
    q = torch.randn(1, 6, 16)
    slots = (tables[0].long().repeat_interleave(4) * 4 + torch.arange(4).repeat(tables.shape[1]))[:23]
    keys = k.flatten(0, 1)[slots].repeat_interleave(3, 1).transpose(0, 1)  # [heads, len, D]
    values = v.flatten(0, 1)[slots].repeat_interleave(3, 1).transpose(0, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q[0].unsqueeze(1), keys, values).squeeze(1)
    assert_close(paged_attention_decode(q, k, v, tables, lens, 16**-0.5)[0], expected)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), skip_every=st.sampled_from([0, 3]), dtype=st.sampled_from(FLOAT_DTYPES))
def test_kv_cache_write_equals_reference(tokens, skip_every, dtype):
    k_cache, v_cache = torch.randn(8, 8, 2, 16).to(dtype), torch.randn(8, 8, 2, 16).to(dtype)
    k, v = torch.randn(tokens, 2, 16).to(dtype), torch.randn(tokens, 2, 16).to(dtype)
    slots = torch.randperm(64)[:tokens]
    if skip_every:
        slots[::skip_every] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_write(expected_k, expected_v, k, v, slots)
    kv_cache_write(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_padding_rows_read_nothing_and_are_zero():
    """Context length 0 is a padding row (CUDA graphs pad decode batches to their bucket): its output is zero, its
    block table is not read, and the other rows are as without it."""
    k, v, tables, lens = random_cache([5, 0, 9], 4, 2, 16, torch.float32)
    tables[1] = 10**6  # would be outside the cache
    q = torch.randn(3, 4, 16)
    out = paged_attention_decode(q, k, v, tables, lens, 0.25)
    assert torch.equal(out[1], torch.zeros(4, 16))
    keep = torch.tensor([0, 2])
    assert torch.equal(out[keep], paged_attention_decode(q[keep], k, v, tables[keep], lens[keep], 0.25))
    assert_close(out, reference.paged_attention_decode(q, k, v, tables, lens, 0.25))


def test_bad_inputs_name_the_problem():
    k, v, tables, lens = random_cache([5], 4, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="heads a multiple of 2"):
        paged_attention_decode(torch.randn(1, 3, 16), k, v, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="context length 99"):
        paged_attention_decode(torch.randn(1, 2, 16), k, v, tables, torch.tensor([99], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="context length -1"):
        paged_attention_decode(torch.randn(1, 2, 16), k, v, tables, torch.tensor([-1], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kv_cache_write(k, v, torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.tensor([10_000]))
    with pytest.raises(RuntimeError, match="head_dim 512"):
        big = torch.randn(2, 4, 1, 512)
        paged_attention_decode(torch.randn(1, 1, 512), big, big, tables, lens, 1.0)


def test_opcheck():
    k, v, tables, lens = random_cache([5, 9], 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    torch.library.opcheck(torch.ops.lorax_core.paged_attention_decode.default, (q, k, v, tables, lens, 0.25, 0))
    torch.library.opcheck(torch.ops.lorax_core.kv_cache_write.default,
                          (k, v, torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.tensor([0, -1, 7])))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,group,window", [(128, 4, 0), (64, 1, 0), (16, 3, 5), (256, 2, 100), (80, 8, 0),
                                                    (128, 8, 37), (128, 9, 0), (32, 2, 0)])
def test_decode_attention_cuda_equals_cpu(dtype, head_dim, group, window):
    lengths = [1, 17, 300, 4096, 0, 33]  # 0: a padding row of a CUDA graph
    k, v, tables, lens = random_cache(lengths, 16, 2, head_dim, dtype)
    q = torch.randn(len(lengths), 2 * group, head_dim).to(dtype)
    expected = paged_attention_decode(q, k, v, tables, lens, head_dim**-0.5, window)
    out = paged_attention_decode(q.cuda(), k.cuda(), v.cuda(), tables.cuda(), lens.cuda(), head_dim**-0.5, window)
    assert_close(out.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,block_size,window", [(1, 16, 0), (3, 16, 50), (2, 1, 0)])
def test_decode_attention_cuda_wide_tables_and_layer_views(batch, block_size, window):
    """CUDA graphs pass block tables as wide as the longest allowed context (here 4096 positions) with short
    contexts, and each layer's cache is a view into one tensor: the split count follows the table width, and the
    splits that hold no position must add nothing."""
    rng = torch.Generator().manual_seed(batch)
    lengths = [1, 200, 77][:batch]
    width, kv_heads, head_dim, layers = 4096 // block_size, 8, 128, 3
    blocks = batch * width + 1
    cache = torch.randn(layers, 2, blocks, block_size, kv_heads, head_dim, generator=rng).bfloat16()
    tables = torch.randperm(blocks - 1, generator=rng)[: batch * width].view(batch, width).int()
    lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(batch, kv_heads * 4, head_dim, generator=rng).bfloat16()
    gpu = cache.cuda()
    for layer in range(layers):
        expected = paged_attention_decode(q, cache[layer, 0], cache[layer, 1], tables, lens, 0.088, window)
        out = paged_attention_decode(q.cuda(), gpu[layer, 0], gpu[layer, 1], tables.cuda(), lens.cuda(), 0.088,
                                     window)
        assert_close(out.cpu(), expected)
        # the splits merged by the last CTA of each (sequence, kv head) instead of a second kernel: the same bits,
        # and the counters back to zero for the next layer
        counters = torch.zeros(batch * kv_heads, dtype=torch.int32, device="cuda")
        fused = paged_attention_decode(q.cuda(), gpu[layer, 0], gpu[layer, 1], tables.cuda(), lens.cuda(), 0.088,
                                       window, counters)
        assert torch.equal(fused, out) and not counters.any()


@pytest.mark.cuda
def test_decode_attention_cuda_is_deterministic():
    """The split kernel sums its position groups in a fixed order: one input, one output, bit for bit."""
    k, v, tables, lens = random_cache([4096, 700, 3], 16, 8, 128, torch.bfloat16, device="cuda")
    q = torch.randn(3, 32, 128).bfloat16().cuda()
    first = paged_attention_decode(q, k, v, tables, lens, 0.088)
    counters = torch.zeros(3 * 8, dtype=torch.int32, device="cuda")
    for _ in range(5):
        assert torch.equal(paged_attention_decode(q, k, v, tables, lens, 0.088), first)
        assert torch.equal(paged_attention_decode(q, k, v, tables, lens, 0.088, counters=counters), first)


@pytest.mark.cuda
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv-slices"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kv_cache_write_cuda_equals_cpu(dtype, strided):
    k_cache, v_cache = torch.randn(64, 16, 8, 128).to(dtype), torch.randn(64, 16, 8, 128).to(dtype)
    if strided:  # k and v as the model passes them: column slices of one qkv output, rows strided
        qkv = torch.randn(100, (32 + 16) * 128).to(dtype)
        k, v = (part.view(100, 8, 128) for part in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)[1:])
    else:
        k, v = torch.randn(100, 8, 128).to(dtype), torch.randn(100, 8, 128).to(dtype)
    slots = torch.randperm(64 * 16)[:100]
    slots[::7] = -1
    gpu = [t.cuda() for t in (k_cache, v_cache)]
    kv_cache_write(*gpu, k.cuda(), v.cuda(), slots.cuda())
    kv_cache_write(k_cache, v_cache, k, v, slots)
    assert torch.equal(gpu[0].cpu(), k_cache) and torch.equal(gpu[1].cpu(), v_cache)


# ------------------------------- paged_attention_decode_sgmv_shrink: attention and o_proj's LoRA shrink of its output

SHRINK_RANKS = [[8], [16], [1], [128], [4]]  # adapter 4 has no o_proj (rank 0 there: nothing to shrink)


def attention_shrink_case(lengths, kv_heads, group, head_dim, dtype, row_slots, device="cpu", page_size=64, window=0,
                          seed=0):
    """Decode attention inputs, and a pool of adapters with o_proj reading heads * head_dim columns (ranks
    SHRINK_RANKS; the last one only has q_proj), row b using slot row_slots[b] (-1: none) in segments of equal
    neighbours: the op's keyword arguments."""
    from lora_helpers import make_pool, random_adapter

    gen = torch.Generator().manual_seed(seed)
    width = kv_heads * group * head_dim
    modules = {"q_proj": (width, 24), "o_proj": (width, 40)}
    pages = sum(max(r) * (-(-n_in // page_size) - (-n_out // page_size))
                for r in SHRINK_RANKS for n_in, n_out in modules.values())
    pool = make_pool(modules, num_layers=2, budget_pages=2 * pages, page_size=page_size, max_slots=8, dtype=dtype,
                     device=device)
    for i, r in enumerate(SHRINK_RANKS):
        only = ["q_proj"] if i == len(SHRINK_RANKS) - 1 else None
        pool.load(f"a{i}", random_adapter(modules, r, num_layers=2, only=only, gen=gen), scale=1.0)
        pool.wait(f"a{i}")
    slots = [pool.slot(f"a{s}") if s >= 0 else -1 for s in row_slots]
    starts, seg = [0], []
    for b, s in enumerate(slots):  # one segment per run of equal slots
        if seg and seg[-1] == s:
            starts[-1] = b + 1
        else:
            seg.append(s)
            starts.append(b + 1)
    k, v, tables, lens = random_cache(lengths, 16, kv_heads, head_dim, dtype, device, seed)
    q = (torch.randn(len(lengths), kv_heads * group, head_dim, generator=gen) * 2).to(dtype).to(device)
    return {"q": q, "k_cache": k, "v_cache": v, "block_tables": tables, "context_lens": lens, "scale": head_dim**-0.5,
            "sliding_window": window, "pool": pool, "layer": 1, "modules": "o_proj",
            "seg_starts": torch.tensor(starts, dtype=torch.int32, device=device),
            "seg_slots": torch.tensor(seg, dtype=torch.int32, device=device)}, slots


def o_shrink(out, args):
    """sgmv_shrink of the attention output for o_proj: what o's nf4_linear_sgmv would do first."""
    pool = args["pool"]
    return torch.ops.lorax_core.sgmv_shrink(out.flatten(1), pool.arena, pool.page_table, pool.ranks,
                                            args["seg_starts"], args["seg_slots"], args["layer"],
                                            [pool.module_index("o_proj")], pool.page_size)


SHRINK_CASES = [  # lengths, kv heads, group, head_dim, each row's adapter (-1: none; 4 has no o_proj)
    ([5, 300, 0, 17, 129], 2, 4, 128, [0, 1, 1, -1, 4]),
    ([40], 1, 1, 64, [3]),
    ([1, 200], 2, 3, 32, [2, 0]),
    ([9, 70, 3], 2, 2, 80, [1, -1, 0]),  # head_dim 80: the general kernel, so the two ops
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", SHRINK_CASES, ids=str)
def test_attention_sgmv_shrink_is_the_two_ops_and_the_reference(case, dtype):
    """On the CPU: out is paged_attention_decode's and v the sgmv_shrink of out for o_proj, bit for bit; v is each
    row's out @ A_o.T (zero past its rank, and for rows without an adapter or whose adapter leaves o alone)."""
    lengths, kv_heads, group, head_dim, rows = case
    args, slots = attention_shrink_case(lengths, kv_heads, group, head_dim, dtype, rows)
    counters = torch.zeros(len(lengths) * (kv_heads + 1), dtype=torch.int32)
    out, v = paged_attention_decode_sgmv_shrink(**args, counters=counters)
    attention = {k: args[k] for k in ("q", "k_cache", "v_cache", "block_tables", "context_lens", "scale",
                                      "sliding_window")}
    assert torch.equal(out, paged_attention_decode(**attention))
    assert torch.equal(v, o_shrink(out, args))
    pool = args["pool"]
    a_o = {pool.slot(f"a{i}"): pool.dense(f"a{i}", 1, "o_proj")[0] for i in range(len(SHRINK_RANKS) - 1)}
    expected_out, expected_v = reference.paged_attention_decode_sgmv_shrink(
        *attention.values(), slots, [a_o], pool.page_table.shape[4])
    assert_close(out, expected_out)
    assert_close(v, expected_v, torch.float32, scale=8)
    assert torch.equal(v != 0, expected_v != 0)  # the zeros are exact


def test_attention_sgmv_shrink_bad_inputs():
    args, _ = attention_shrink_case([5, 9], 2, 2, 16, torch.float32, [0, 1])
    with pytest.raises(RuntimeError, match=r"at least batch x \(kv_heads \+ 1\) = 6 of them"):
        paged_attention_decode_sgmv_shrink(**args, counters=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="module 'down_proj' is not in this pool"):
        paged_attention_decode_sgmv_shrink(**{**args, "modules": "down_proj"})
    with pytest.raises(RuntimeError, match="activations are Half, the adapter pool holds Float"):
        half = {k: args[k].half() for k in ("q", "k_cache", "v_cache")}
        paged_attention_decode_sgmv_shrink(**{**args, **half})
    out, v = paged_attention_decode_sgmv_shrink(**args)  # without counters: the same
    counted = paged_attention_decode_sgmv_shrink(**args, counters=torch.zeros(6, dtype=torch.int32))
    assert torch.equal(out, counted[0]) and torch.equal(v, counted[1])
    pool = args["pool"]
    torch.library.opcheck(torch.ops.lorax_core.paged_attention_decode_sgmv_shrink.default,
                          (args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"],
                           0.25, 0, pool.arena, pool.page_table, pool.ranks, args["seg_starts"], args["seg_slots"], 1,
                           [pool.module_index("o_proj")], pool.page_size, torch.zeros(6, dtype=torch.int32)))


def check_device_attention_shrink(case, dtype, device, run=lambda f: f(), page_size=64, window=0):
    """The device op with counters (the split kernel's CTAs shrink their output; the last of a row's kv heads sums)
    against the same device's two ops: out bit for bit, v up to the fp32 sums' order; the counters left zero."""
    lengths, kv_heads, group, head_dim, rows = case
    args, _ = attention_shrink_case(lengths, kv_heads, group, head_dim, dtype, rows, device, page_size, window)
    counters = torch.zeros(len(lengths) * (kv_heads + 1) + 3, dtype=torch.int32, device=device)
    attention = {k: args[k] for k in ("q", "k_cache", "v_cache", "block_tables", "context_lens", "scale",
                                      "sliding_window")}
    for _ in range(2):  # the second call finds the counters it left
        out, v = run(lambda: paged_attention_decode_sgmv_shrink(**args, counters=counters))
        assert not counters.any()
        assert torch.equal(out, run(lambda: paged_attention_decode(**attention, counters=counters)))
        shrunk = run(lambda out=out: o_shrink(out, args))
        torch.testing.assert_close(v, shrunk, rtol=1e-4, atol=1e-4)
        assert torch.equal(v != 0, shrunk != 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", SHRINK_CASES, ids=str)
def test_attention_sgmv_shrink_cuda(case, dtype):
    check_device_attention_shrink(case, dtype, "cuda")
    check_device_attention_shrink(case, dtype, "cuda", page_size=16 // torch.empty(0, dtype=dtype).element_size(),
                                  window=33)
