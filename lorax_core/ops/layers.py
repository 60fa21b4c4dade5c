"""Fused per-layer op wrappers: RMSNorm (after the residual add), rotary embeddings, SwiGLU's activation.

Each rounds to the activation dtype where transformers' eager code does (csrc/layers/layers.h), so results
match transformers in every dtype, up to the order of RMSNorm's fp32 sum.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm of each row.

    Semantics:
        out[t] = weight * T(x[t] * rsqrt(mean(x[t]^2) + eps))      fp32 math, T(): round to x's dtype
    Shapes: x [T, n] (rows may be strided), weight [n] in x's dtype -> out [T, n] contiguous.
    """
    return torch.ops.lorax_core.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it, in one pass.

    Semantics:
        s = T(x + residual);  return rms_norm(s, weight, eps), s
    Shapes: x, residual [T, n] -> ([T, n], [T, n]).
    """
    return torch.ops.lorax_core.add_rms_norm(x, residual, weight, eps)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor) -> None:
    """Rotate q and k in place by each token's position (the rotate_half layout of Llama / Mistral / Qwen2).

    Semantics:
        c, s = cos[positions[t]], sin[positions[t]];  for x in q[t, h], k[t, h], i < D / 2:
            x[i], x[i + D/2] = T(T(x[i] c[i]) - T(x[i + D/2] s[i])),  T(T(x[i + D/2] c[i + D/2]) + T(x[i] s[i + D/2]))
    Shapes: q [T, heads, D], k [T, kv_heads, D] (head_dim contiguous; rows and heads may be strided),
    cos / sin [positions, D] in q's dtype, positions int64 [T].
    """
    torch.ops.lorax_core.rotary_embedding(q, k, cos, sin, positions)


def rotary_kv_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Rotate q and k in place, then store the rotated k and v in the paged KV cache: what attention does before
    it reads the cache, one kernel on CUDA where the two ops are two.

    Semantics:
        rotary_embedding(q, k, cos, sin, positions); kv_cache_write(k_cache, v_cache, k, v, slot_mapping)
    Shapes: as the two ops; v [T, kv_heads, D] with head_dim contiguous (rows and heads may be strided). On the
    CPU, bad positions or slots are refused before anything changes.
    """
    torch.ops.lorax_core.rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation.

    Semantics:
        out = T(T(gate / (1 + exp(-gate))) * up)
    Shapes: gate, up [T, n] (rows may be strided) -> out [T, n] contiguous.
    """
    return torch.ops.lorax_core.silu_mul(gate, up)
