"""Multi-adapter LoRA op wrappers (SGMV for prefill segments, BGMV for per-token decode) over an AdapterPool."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorax_core.adapters.pool import AdapterPool


def _pool_args(pool: AdapterPool):
    return pool.arena, pool.page_table, pool.ranks


def sgmv(y: torch.Tensor, x: torch.Tensor, pool: AdapterPool, layer: int, module: str,
         seg_starts: torch.Tensor, seg_slots: torch.Tensor) -> torch.Tensor:
    """Add the LoRA delta of each segment's adapter to y, in place (prefill).

    Semantics:
        for segment s, tokens t in [seg_starts[s], seg_starts[s + 1]), a = seg_slots[s] (-1: skip):
            y[t] += scale[a] * (x[t] @ A[a].T) @ B[a].T      A[a] [r_a, in], B[a] [out, r_a]
    Shapes: x [T, in], y [T, out] (same dtype as the pool), seg_starts [S + 1], seg_slots [S]. Returns y.
    """
    m = pool.module_index(module)
    v = torch.ops.lorax_core.sgmv_shrink(x, *_pool_args(pool), seg_starts, seg_slots, layer, m, pool.page_size)
    torch.ops.lorax_core.sgmv_expand(y, v, *_pool_args(pool), pool.scales, seg_starts, seg_slots, layer, m,
                                     pool.page_size)
    return y


def bgmv(y: torch.Tensor, x: torch.Tensor, pool: AdapterPool, layer: int, module: str,
         slots: torch.Tensor) -> torch.Tensor:
    """Add each token's LoRA delta to y, in place (decode); tokens sharing an adapter read its weights once.

    Semantics:
        for token t with a = slots[t] >= 0:  y[t] += scale[a] * (x[t] @ A[a].T) @ B[a].T ;  slots[t] = -1: unchanged
    Shapes: x [T, in], y [T, out] (same dtype as the pool), slots [T] int. Returns y.
    """
    m = pool.module_index(module)
    v = torch.ops.lorax_core.bgmv_shrink(x, *_pool_args(pool), slots, layer, m, pool.page_size)
    torch.ops.lorax_core.bgmv_expand(y, v, *_pool_args(pool), pool.scales, slots, layer, m, pool.page_size)
    return y
