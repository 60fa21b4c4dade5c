"""Multi-adapter LoRA op wrappers (SGMV for prefill segments, BGMV for per-token decode) over an AdapterPool."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorax_core.adapters.pool import AdapterPool


def _pool_args(pool: AdapterPool):
    return pool.arena, pool.page_table, pool.ranks


def _modules(pool: AdapterPool, width: int, modules: str | Sequence[str]) -> tuple[list[int], list[int]]:
    """Pool indices of the modules and their column offsets in y, whose `width` columns hold their outputs side by
    side."""
    names = [modules] if isinstance(modules, str) else list(modules)
    indices = [pool.module_index(n) for n in names]
    columns = list(itertools.accumulate((pool.config.modules[n][1] for n in names), initial=0))
    if columns[-1] != width:
        raise ValueError(f"y has {width} columns; the outputs of {names} take {columns[-1]}")
    return indices, columns


def sgmv(y: torch.Tensor, x: torch.Tensor, pool: AdapterPool, layer: int, modules: str | Sequence[str],
         seg_starts: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
    """Add the LoRA delta of each segment's adapter to y, in place (prefill).

    Semantics:
        for segment s, tokens t in [seg_starts[s], seg_starts[s + 1]), a = seg_slots[s] (-1: skip), module i:
            y[t, c_i : c_i + out_i] += scale[a] * (x[t] @ A_i[a].T) @ B_i[a].T      A_i [r, in], B_i [out_i, r]
        c_i = out_0 + ... + out_(i-1): y holds the modules' outputs side by side (a fused projection: q, k, v)
    Shapes: x [T, in], y [T, sum(out_i)] (same dtype as the pool), seg_starts [S + 1], seg_slots [S]. Returns y.
    """
    m, columns = _modules(pool, y.shape[-1], modules)
    torch.ops.lorax_core.sgmv(y, x, *_pool_args(pool), pool.scales, seg_starts, seg_slots, layer, m, columns,
                              pool.page_size)
    return y


def bgmv(y: torch.Tensor, x: torch.Tensor, pool: AdapterPool, layer: int, modules: str | Sequence[str],
         slots: torch.Tensor) -> torch.Tensor:
    """Add each token's LoRA delta to y, in place (decode). Each distinct adapter's weights come from memory once:
    on CUDA, up to 64 tokens run a CTA per token and tokens sharing an adapter read it from L2 after the first; more
    tokens are grouped by adapter first (one kernel) and each group reads it once.

    Semantics:
        for token t with a = slots[t] >= 0, module i:  y[t, c_i : c_i + out_i] += scale[a] * (x[t] @ A_i[a].T) @ B_i[a].T
        slots[t] = -1: unchanged; c_i as in sgmv
    Shapes: x [T, in], y [T, sum(out_i)] (same dtype as the pool), slots [T] int. Returns y.
    """
    m, columns = _modules(pool, y.shape[-1], modules)
    torch.ops.lorax_core.bgmv(y, x, *_pool_args(pool), pool.scales, slots, layer, m, columns, pool.page_size)
    return y


def add_rms_norm_sgmv_shrink(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             pool: AdapterPool, layer: int, modules: str | Sequence[str], seg_starts: torch.Tensor,
                             seg_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add and RMSNorm (add_rms_norm), and the LoRA shrink of the normed rows for a projection that
    reads them: (out, residual_out, v), v for nf4_linear_sgmv(..., v=v).

    Semantics:
        out, s = add_rms_norm(x, residual, weight, eps)
        v[t, i * R : i * R + r] = out[t] @ A_i[a].T    (a: row t's segment adapter; other columns of v zero)
    Shapes: x, residual [T, n], weight [n] -> out, s [T, n] in x's dtype, v float32 [T, len(modules) * R], R the
    pool's max rank. On CUDA one row in fp16 / bf16 is one kernel (a batch-1 decode step); more, the two ops.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    return torch.ops.lorax_core.add_rms_norm_sgmv_shrink(x, residual, weight, eps, *_pool_args(pool), seg_starts,
                                                         seg_slots, layer, [pool.module_index(n) for n in names],
                                                         pool.page_size)
