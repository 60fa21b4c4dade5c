"""NF4 op wrappers: they take an `NF4Weight` and call the compiled ops."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorax_core.quant.nf4 import NF4Weight


def _state_args(w: NF4Weight):
    return (w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset, w.blocksize, w.nested_blocksize)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight.

    Semantics:
        absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // nested_blocksize] + offset   (double quant)
        out.flatten()[i] = NF4[code(i)] * absmax[i // blocksize]                      (fp32, then cast to dtype)
    Shapes: out has `w.shape`; dtype defaults to `w.dtype`.
    """
    dtype = dtype or w.dtype
    return torch.ops.lorax_core.nf4_dequantize(*_state_args(w), list(w.shape), dtype)


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequantize(w).T (+ bias)` for any leading batch shape of x.

    Semantics:
        y[..., o] = sum_i x[..., i] * W[o, i] (+ bias[o]),  W = nf4_dequantize(w, x.dtype)   [out, in]
    Shapes: x [..., in], w [out, in], bias [out] -> y [..., out], dtype of x (fp32 accumulation).
    On CUDA with fp16/bf16 x: a GEMV for M <= 4 rows of x (it multiplies x by the fp32 weights, not rounded to
    x's dtype: each result is the fp32 product rounded once), a fused dequant + tensor-core GEMM up to 32 rows,
    dequantize + cuBLAS for more; on CPU: dequantize + matmul.
    """
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"nf4_linear: x has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    return torch.ops.lorax_core.nf4_linear(x, *_state_args(w), w.shape[0], bias)


def _linear_setup_context(ctx, inputs, output):
    x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, out_features, bias = inputs
    ctx.state = (codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize)
    ctx.shape = [out_features, x.shape[-1]]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    w = torch.ops.lorax_core.nf4_dequantize(*ctx.state, ctx.shape, grad.dtype)  # [out, in]
    grad_x = grad @ w
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, None, None, None, grad_bias


# The weight is frozen (QLoRA); gradients flow to x and the bias.
torch.library.register_autograd("lorax_core::nf4_linear", _linear_backward, setup_context=_linear_setup_context)
