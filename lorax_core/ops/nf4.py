"""NF4 op wrappers: they take an `NF4Weight` and call the compiled ops."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lorax_core.adapters.pool import AdapterPool
    from lorax_core.quant.nf4 import NF4Weight


def _state_args(w: NF4Weight):
    return (w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset, w.blocksize, w.nested_blocksize)


def _parts(w: NF4Weight) -> dict:
    """The weight's per-part offsets (a fused projection's double-quantized parts): every op's last two arguments."""
    return {"part_starts": list(w.part_starts), "part_offsets": list(w.part_offsets)}


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight.

    Semantics:
        absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // nested_blocksize] + offset   (double quant;
                    offset: w.part_offsets[j] for blocks b >= w.part_starts[j], the last such j, else w.offset)
        out.flatten()[i] = NF4[code(i)] * absmax[i // blocksize]                      (fp32, then cast to dtype)
    Shapes: out has `w.shape`; dtype defaults to `w.dtype`.
    """
    dtype = dtype or w.dtype
    return torch.ops.lorax_core.nf4_dequantize(*_state_args(w), list(w.shape), dtype, **_parts(w))


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequantize(w).T (+ bias)` for any leading batch shape of x.

    Semantics:
        y[..., o] = sum_i x[..., i] * W[o, i] (+ bias[o]),  W = nf4_dequantize(w, x.dtype)   [out, in]
    Shapes: x [..., in], w [out, in], bias [out] -> y [..., out], dtype of x (fp32 accumulation).
    On CUDA with fp16/bf16 x: a GEMV for up to 8 rows of x (it multiplies x by the NF4 values rounded to x's dtype
    and scales each block's sum by its fp32 absmax: each result is that fp32 product rounded once; bitsandbytes
    rounds the scaled weight and each product too), a fused dequant + tensor-core GEMM up to 32 rows (weights
    rounded to x's dtype), dequantize + cuBLAS for more; on CPU: dequantize + matmul.
    """
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"nf4_linear: x has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return torch.ops.lorax_core.nf4_linear(x, *_state_args(w), w.shape[0], bias, **_parts(w))


def nf4_linear_sgmv(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, pool: AdapterPool | None = None,
                    layer: int = 0, modules: str | Sequence[str] = (), seg_starts: torch.Tensor | None = None,
                    seg_slots: torch.Tensor | None = None, silu_mul: bool = False,
                    v: torch.Tensor | None = None) -> torch.Tensor:
    """nf4_linear, plus each segment's LoRA delta (pool given), then SwiGLU's activation (silu_mul) in one op.

    Semantics:
        y = nf4_linear(x, w, bias)                                       [T, out]
        sgmv(y, x, pool, layer, modules, seg_starts, seg_slots)          (pool given: y holds the modules' outputs)
        silu_mul: y = silu_mul(y[:, :out / 2], y[:, out / 2:])          [T, out / 2] (gate rows, then up rows)
    Shapes: x [T, in] (any leading shape without a pool), w [out, in]. Returns y in x's dtype. v: x's shrink for
    these modules when it is already done (add_rms_norm_sgmv_shrink): then only the expand is left.
    On CUDA with up to 8 rows of x (a decode step at batch 1 to 8) in fp16 / bf16: one LoRA shrink kernel, then
    the NF4 GEMV adds bias and each row's LoRA delta to its fp32 sums, rounds each output once, and applies silu_mul
    (as the silu_mul op rounds) in its epilogue: two kernels instead of four. Elsewhere the ops one after the
    other, whose y is rounded after nf4_linear and again after the LoRA add.
    """
    return torch.ops.lorax_core.nf4_linear_sgmv(*_linear_sgmv_args("nf4_linear_sgmv", x, w, bias, pool, layer, modules,
                                                                   seg_starts, seg_slots, v), silu_mul, **_parts(w))


def nf4_linear_sgmv_silu_shrink(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, pool: AdapterPool, layer: int,
                                modules: Sequence[str], seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                                next_modules: str | Sequence[str], v: torch.Tensor | None = None,
                                counters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused gate | up projection with SwiGLU (nf4_linear_sgmv, silu_mul) and the LoRA shrink of its output for the
    projection that reads it (the MLP's down): (h, v_next), v_next for nf4_linear_sgmv(h, ..., v=v_next).

    Semantics:
        h = nf4_linear_sgmv(x, w, bias, pool, layer, modules, seg_starts, seg_slots, silu_mul=True, v=v)  [T, out / 2]
        v_next[t, i * R : i * R + r] = h[t] @ A_i[a].T    (next module i of the same layer, a: row t's segment
                                                          adapter, R the pool's max rank; other columns zero)
    counters: int32 zeros (left zero; decode attention's may be shared). On CUDA with up to 8 rows of x in fp16 /
    bf16, counters, one next module and pages of at least 8 elements, the GEMV's epilogue does the shrink: each CTA
    sums its outputs' share and the last one to finish adds the shares up in a fixed order. The shrink kernel that
    would start the next projection is gone. Elsewhere nf4_linear_sgmv, then sgmv_shrink.
    """
    names = [next_modules] if isinstance(next_modules, str) else list(next_modules)
    args = _linear_sgmv_args("nf4_linear_sgmv_silu_shrink", x, w, bias, pool, layer, modules, seg_starts, seg_slots, v)
    return torch.ops.lorax_core.nf4_linear_sgmv_silu_shrink(*args, [pool.module_index(n) for n in names], counters,
                                                            **_parts(w))


def nf4_linear_sgmv_rotary(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None, pool: AdapterPool | None,
                           layer: int, modules: Sequence[str], seg_starts: torch.Tensor | None,
                           seg_slots: torch.Tensor | None, v: torch.Tensor | None, q_heads: int, kv_heads: int,
                           cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """A fused q | k | v projection (nf4_linear_sgmv), then rotary on its q and k and their k and v into the paged KV
    cache (rotary_kv_cache_write): what attention does before it reads the cache.

    Semantics:
        y = nf4_linear_sgmv(x, w, bias, pool, layer, modules, seg_starts, seg_slots, v=v)      [T, (H + 2 KV) * D]
        q, k, v = y's first H heads of D, next KV, last KV                              (views [T, heads, D])
        rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    Returns y (q and k rotated). On CUDA with up to 8 rows of x in fp16 / bf16 and D a power of two >= 16, the
    GEMV's epilogue rotates each output pair and writes the cache: the rotary kernel is gone.
    """
    args = _linear_sgmv_args("nf4_linear_sgmv_rotary", x, w, bias, pool, layer, modules, seg_starts, seg_slots, v)
    return torch.ops.lorax_core.nf4_linear_sgmv_rotary(*args, q_heads, kv_heads, cos, sin, positions, k_cache, v_cache,
                                                       slot_mapping, **_parts(w))


def _linear_sgmv_args(op: str, x, w, bias, pool, layer, modules, seg_starts, seg_slots, v) -> tuple:
    """nf4_linear_sgmv's arguments up to page_size (the rotary op's too), as the schema orders them."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    if pool is None:
        lora, layer, indices, columns, page_size = (None,) * 7, 0, [], [], 0
    else:
        from lorax_core.ops.lora import _modules, _pool_args

        indices, columns = _modules(pool, w.shape[0], modules)
        lora, page_size = (*_pool_args(pool), pool.scales, seg_starts, seg_slots, v), pool.page_size
    return (x, *_state_args(w), w.shape[0], bias, *lora, layer, indices, columns, page_size)


def _linear_setup_context(ctx, inputs, output):
    x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, out_features, bias = inputs[:10]
    ctx.state = (codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize)
    ctx.parts = dict(zip(("part_starts", "part_offsets"), inputs[10:]))
    ctx.shape = [out_features, x.shape[-1]]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    w = torch.ops.lorax_core.nf4_dequantize(*ctx.state, ctx.shape, grad.dtype, **ctx.parts)  # [out, in]
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, None, None, None, grad_bias, None, None


# The weight is frozen (QLoRA); gradients flow to x and the bias.
torch.library.register_autograd("lorax_core::nf4_linear", _linear_backward, setup_context=_linear_setup_context)
