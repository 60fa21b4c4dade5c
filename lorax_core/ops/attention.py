"""Paged KV cache op wrappers: store new keys/values in their slots, and decode attention over the blocks."""
from __future__ import annotations

import torch


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
