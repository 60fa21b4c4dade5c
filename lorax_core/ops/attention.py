"""Paged KV cache op wrappers: store new keys/values in their slots, and decode attention over the blocks."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorax_core.adapters.pool import AdapterPool


def kv_cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the keys and values of new tokens in the paged cache, in place.

    Semantics:
        for token t with s = slot_mapping[t] >= 0:  k_cache.flat[s] = k[t];  v_cache.flat[s] = v[t]
        (flat = view [blocks * block_size, kv_heads, head_dim]; s = block * block_size + offset)
    Shapes: caches [blocks, block_size, kv_heads, head_dim], k / v [T, kv_heads, head_dim], slot_mapping int64 [T].
    """
    torch.ops.lorax_core.kv_cache_write(k_cache, v_cache, k, v, slot_mapping)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           counters: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over its KV cache blocks (decode).

    Semantics:
        L = context_lens[b], positions P = [max(0, L - window), L) (window None / 0: [0, L)),
        keys K[j] = k_cache.flat[block_tables[b, j // block_size] * block_size + j % block_size, h // group]
        out[b, h] = softmax(scale * q[b, h] . K[P]) @ V[P]        group = heads / kv_heads (GQA), fp32 math
        L = 0 is a padding row (CUDA graphs pad decode batches so): out[b] = 0, no block read
    Shapes: q [B, heads, head_dim] -> out [B, heads, head_dim]; block_tables int32 [B, max_blocks];
    context_lens int32 [B] (the new token included: its k, v are written first).
    counters: int32 zeros, at least B * kv_heads (left zero; may be shared by every layer). On CUDA, a long
    context's (sequence, kv head) is cut into splits that a second kernel merges; with counters, the last split to
    finish merges them instead (one kernel). Ignored on the CPU.
    """
    return torch.ops.lorax_core.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                       sliding_window or 0, counters)


def paged_attention_decode_sgmv_shrink(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                       sliding_window: int | None, pool: AdapterPool, layer: int,
                                       modules: str | Sequence[str], seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                                       counters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention (paged_attention_decode) and the LoRA shrink of its output for the projection that reads it
    (o_proj): (out, v), v for that projection's nf4_linear_sgmv(out.flatten(1), ..., v=v).

    Semantics:
        out = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
        v[b, i * R : i * R + r] = out[b].flatten() @ A_i[a].T   (module i, a: row b's segment adapter, R the pool's
                                                                 max rank; other columns of v zero)
    Shapes: q [B, heads, head_dim] -> out [B, heads, head_dim], v float32 [B, len(modules) * R].
    counters: int32 zeros, at least B * (kv_heads + 1): decode attention's, then one per sequence (left zero; may be
    shared by every layer). On CUDA with counters, one module and pages of at least 16 bytes, the CTA that writes a
    (sequence, kv head)'s output multiplies it by its columns of the A rows, and the last of the sequence's kv heads
    sums their shares: the shrink kernel that would start the o projection is gone. Elsewhere the two ops.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    return torch.ops.lorax_core.paged_attention_decode_sgmv_shrink(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window or 0, pool.arena, pool.page_table,
        pool.ranks, seg_starts, seg_slots, layer, [pool.module_index(n) for n in names], pool.page_size, counters)
