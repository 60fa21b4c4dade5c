"""Fused layer ops (rms_norm, add_rms_norm, rotary_embedding, rotary_kv_cache_write, silu_mul): CPU op == reference
== transformers (bit for bit in fp16 / bf16, but for RMSNorm's rare one-ulp flips); CUDA op == CPU op."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from conftest import FLOAT_DTYPES, assert_close
from lorax_core.ops import add_rms_norm, reference, rms_norm, rotary_embedding, rotary_kv_cache_write, silu_mul

LOW_PRECISION = [torch.float16, torch.bfloat16]


def strided_rows(rows: int, cols: int, dtype, offset: int = 3, device="cpu") -> torch.Tensor:
    """[rows, cols] as a column slice of a wider tensor (rows strided, as the parts of a fused projection)."""
    return (torch.randn(rows, cols + offset + 5) * 3).to(dtype).to(device)[:, offset:offset + cols]


def assert_same(actual: torch.Tensor, expected: torch.Tensor):
    """Bit-identical in fp16 / bf16; in fp32 equal up to the order of a sum."""
    if actual.dtype == torch.float32:
        assert_close(actual, expected)
    else:
        assert torch.equal(actual, expected), (actual.float() - expected.float()).abs().max()


def assert_norm_same(actual: torch.Tensor, expected: torch.Tensor):
    """RMSNorm: its fp32 sum of squares runs in another order than torch's, which moves the scale by an fp32 ulp
    and, rarely, flips the rounding of an element to fp16 / bf16: at most one ulp there, the rest identical."""
    if actual.dtype == torch.float32:
        return assert_close(actual, expected)
    eps = torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=torch.finfo(actual.dtype).tiny)
    assert (actual != expected).sum() <= max(1, 0.01 * actual.numel())  # one flip is rare, not 1% of 63 elements


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), cols=st.sampled_from([1, 7, 64, 130, 4096]), dtype=st.sampled_from(FLOAT_DTYPES),
       strided=st.booleans(), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_rms_norm_equals_reference(rows, cols, dtype, strided, eps):
    x = strided_rows(rows, cols, dtype) if strided else torch.randn(rows, cols).to(dtype)
    residual = strided_rows(rows, cols, dtype, offset=1)
    w = torch.randn(cols).to(dtype)
    out = rms_norm(x, w, eps)
    assert out.is_contiguous() and out.dtype == dtype
    assert_norm_same(out, reference.rms_norm(x, w, eps))
    out, s = add_rms_norm(x, residual, w, eps)
    expected_out, expected_s = reference.add_rms_norm(x, residual, w, eps)
    assert torch.equal(s, expected_s)
    assert_norm_same(out, expected_out)


def qkv_views(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """q [T, heads, D], k and v [T, kv_heads, D]: column slices of qkv (rows strided), as the model has them."""
    parts = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return [p.view(qkv.shape[0], n, head_dim) for p, n in zip(parts, (heads, kv_heads, kv_heads))]


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(0, 9), heads=st.sampled_from([1, 4, 8]), kv_heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([2, 16, 64, 128]), dtype=st.sampled_from(FLOAT_DTYPES))
def test_rotary_equals_reference_in_place_on_fused_qkv(tokens, heads, kv_heads, head_dim, dtype):
    """q and k are column slices of one qkv output; v, between and after them, is left alone."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv_views(qkv, heads, kv_heads, head_dim)
    cos, sin = torch.randn(50, head_dim).to(dtype), torch.randn(50, head_dim).to(dtype)
    positions = torch.randint(0, 50, (tokens,))
    expected_q, expected_k, v_before = q.clone(), k.clone(), v.clone()
    reference.rotary_embedding(expected_q, expected_k, cos, sin, positions)
    rotary_embedding(q, k, cos, sin, positions)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k) and torch.equal(v, v_before)


def rotary_cache_inputs(tokens, heads, kv_heads, head_dim, dtype, block_size=4, seed=0):
    """(qkv, caches, cos, sin, positions, slot_mapping): a fused projection's output, random KV caches with a spare
    slot per token, and slots in random order with every third token's -1 (not stored)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    blocks = tokens // block_size + 2
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2)]
    cos, sin = (torch.randn(50, head_dim, generator=g).to(dtype) for _ in range(2))
    positions = torch.randint(0, 50, (tokens,), generator=g)
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    slots[::3] = -1
    return qkv, caches, cos, sin, positions, slots


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(0, 9), heads=st.sampled_from([1, 4, 8]), kv_heads=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([2, 16, 64, 128]), dtype=st.sampled_from(FLOAT_DTYPES))
def test_rotary_kv_cache_write_equals_the_two_ops(tokens, heads, kv_heads, head_dim, dtype):
    """Rotate q and k of a fused qkv output in place, and store the rotated k and v: the reference's two steps."""
    qkv, caches, cos, sin, positions, slots = rotary_cache_inputs(tokens, heads, kv_heads, head_dim, dtype)
    expected_qkv, expected_caches = qkv.clone(), [c.clone() for c in caches]
    q, k, v = qkv_views(expected_qkv, heads, kv_heads, head_dim)
    reference.rotary_kv_cache_write(q, k, v, cos, sin, positions, *expected_caches, slots)
    rotary_kv_cache_write(*qkv_views(qkv, heads, kv_heads, head_dim), cos, sin, positions, *caches, slots)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])


def test_rotary_kv_cache_write_refuses_bad_input_before_changing_anything():
    qkv, caches, cos, sin, positions, slots = rotary_cache_inputs(5, 4, 2, 16, torch.float32)
    before = [t.clone() for t in (qkv, *caches)]
    q, k, v = qkv_views(qkv, 4, 2, 16)
    total = caches[0].shape[0] * caches[0].shape[1]
    with pytest.raises(RuntimeError, match=f"slot {total} of token 1 is outside the cache's {total} slots"):
        rotary_kv_cache_write(q, k, v, cos, sin, positions, *caches, torch.tensor([0, total, 2, 3, -1]))
    with pytest.raises(RuntimeError, match="position 50 of token 4 is outside the tables' 50 positions"):
        rotary_kv_cache_write(q, k, v, cos, sin, torch.tensor([0, 1, 2, 3, 50]), *caches, slots)
    with pytest.raises(RuntimeError, match=r"k and v must be \[tokens, 2, 16\]"):
        rotary_kv_cache_write(q, k, v[:, :1], cos, sin, positions, *caches, slots)
    assert all(torch.equal(t, b) for t, b in zip((qkv, *caches), before))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 9), cols=st.sampled_from([1, 33, 14336]), dtype=st.sampled_from(FLOAT_DTYPES))
def test_silu_mul_equals_reference(rows, cols, dtype):
    gate_up = (torch.randn(rows, 2 * cols) * 4).to(dtype)
    gate, up = gate_up.split(cols, dim=-1)
    out = silu_mul(gate, up)
    assert out.is_contiguous()
    assert_same(out, reference.silu_mul(gate, up))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_ops_equal_transformers(dtype):
    """The oracle's own modules: LlamaRMSNorm (to an ulp), apply_rotary_pos_emb and silu(gate) * up (exactly)."""
    x, residual = torch.randn(5, 256).to(dtype), torch.randn(5, 256).to(dtype)
    norm = LlamaRMSNorm(256, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(256).to(dtype)
    assert_norm_same(rms_norm(x, norm.weight, 1e-5), norm(x))
    out, s = add_rms_norm(x, residual, norm.weight, 1e-5)
    assert torch.equal(s, residual + x)
    assert_norm_same(out, norm(residual + x))

    q, k = torch.randn(5, 4, 64).to(dtype), torch.randn(5, 2, 64).to(dtype)
    freqs = torch.outer(torch.arange(40.0), 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    cos, sin = torch.cat((freqs, freqs), -1).cos().to(dtype), torch.cat((freqs, freqs), -1).sin().to(dtype)
    positions = torch.tensor([0, 3, 17, 39, 8])
    # transformers' layout: q [batch, heads, T, D], cos [batch, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[positions][None],
                                      sin[positions][None])
    rotary_embedding(q, k, cos, sin, positions)
    assert torch.equal(q, hf_q[0].transpose(0, 1)) and torch.equal(k, hf_k[0].transpose(0, 1))

    gate, up = (torch.randn(5, 300) * 4).to(dtype), torch.randn(5, 300).to(dtype)
    assert torch.equal(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_bad_inputs_name_the_problem():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="load the norm weights in the activation dtype"):
        rms_norm(x, torch.randn(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="features must be contiguous"):
        rms_norm(torch.randn(8, 3).t(), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="residual must match x"):
        add_rms_norm(x, torch.randn(3, 9), torch.randn(8), 1e-6)
    q, k, cos = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(10, 16)
    with pytest.raises(RuntimeError, match="position 10 of token 1 is outside the tables' 10 positions"):
        rotary_embedding(q, k, cos, cos, torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="head_dim 15 must be even"):
        rotary_embedding(torch.randn(2, 4, 15), torch.randn(2, 2, 15), cos, cos, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="share one dtype"):
        rotary_embedding(q, k, cos.half(), cos, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="up must match gate"):
        silu_mul(x, torch.randn(3, 9))


def _opcheck_samples(device):
    x, r, w = strided_rows(4, 32, torch.float32, device=device), torch.randn(4, 32, device=device), torch.randn(32, device=device)
    qkv = torch.randn(3, 64, device=device)
    q, k = qkv[:, :32].view(3, 2, 16), qkv[:, 32:48].view(3, 1, 16)
    cos, sin = torch.randn(8, 16, device=device), torch.randn(8, 16, device=device)
    positions = torch.tensor([1, 7, 0], device=device)
    v = qkv[:, 48:].view(3, 1, 16)
    caches = [torch.randn(2, 4, 1, 16, device=device) for _ in range(2)]
    slots = torch.tensor([5, -1, 0], device=device)
    return [("rms_norm", (x, w, 1e-6)), ("add_rms_norm", (x, r, w, 1e-6)),
            ("rotary_embedding", (q, k, cos, sin, positions)), ("silu_mul", (x, r)),
            ("rotary_kv_cache_write", (q, k, v, cos, sin, positions, *caches, slots))]


def test_opcheck():
    for op, args in _opcheck_samples("cpu"):
        torch.library.opcheck(getattr(torch.ops.lorax_core, op).default, args)


@pytest.mark.cuda
def test_opcheck_cuda():
    for op, args in _opcheck_samples("cuda"):
        torch.library.opcheck(getattr(torch.ops.lorax_core, op).default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
@pytest.mark.parametrize("cols", [64, 1000, 4096, 5120, 8192])
def test_norm_and_silu_cuda_equal_cpu(dtype, rows, cols):
    x, residual = strided_rows(rows, cols, dtype), strided_rows(rows, cols, dtype, offset=2)
    w = torch.randn(cols).to(dtype)
    cuda = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    assert_norm_same(rms_norm(*cuda(x, w), 1e-5).cpu(), rms_norm(x, w, 1e-5))
    out, s = add_rms_norm(*cuda(x, residual, w), 1e-5)
    expected_out, expected_s = add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(s.cpu(), expected_s)
    assert_norm_same(out.cpu(), expected_out)
    # silu: CUDA's expf may differ from the CPU's exp by an ulp, which can flip a rounding in fp16 / bf16
    assert_close(silu_mul(*cuda(x, residual)).cpu(), silu_mul(x, residual))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (28, 4, 128), (8, 8, 64), (4, 1, 256)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rotary_cuda_equals_cpu(dtype, heads, kv_heads, head_dim, tokens):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    cos, sin = torch.randn(4096, head_dim).to(dtype), torch.randn(4096, head_dim).to(dtype)
    positions = torch.randint(0, 4096, (tokens,))
    gpu = qkv.cuda()
    rotary_embedding(*qkv_views(gpu, heads, kv_heads, head_dim)[:2], cos.cuda(), sin.cuda(), positions.cuda())
    rotary_embedding(*qkv_views(qkv, heads, kv_heads, head_dim)[:2], cos, sin, positions)
    assert torch.equal(gpu.cpu(), qkv)  # per-element products and sums, rounded as specified: exact


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (28, 4, 128), (4, 1, 256)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rotary_kv_cache_write_cuda_equals_cpu(dtype, heads, kv_heads, head_dim, tokens):
    qkv, caches, cos, sin, positions, slots = rotary_cache_inputs(tokens, heads, kv_heads, head_dim, dtype)
    gpu = [t.cuda() for t in (qkv, *caches, cos, sin, positions, slots)]
    rotary_kv_cache_write(*qkv_views(gpu[0], heads, kv_heads, head_dim), gpu[3], gpu[4], gpu[5], gpu[1], gpu[2],
                          gpu[6])
    rotary_kv_cache_write(*qkv_views(qkv, heads, kv_heads, head_dim), cos, sin, positions, *caches, slots)
    for got, expected in zip(gpu[:3], (qkv, *caches)):
        assert torch.equal(got.cpu(), expected)  # rounded as specified, copies exact
