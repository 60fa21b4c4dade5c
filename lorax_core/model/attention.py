"""Self-attention over the paged KV cache: SDPA over prompt chunks (with their cached prefix), the paged op for
decode rows; one step may hold both."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax_core.model.context import ForwardContext
from lorax_core.model.config import ModelConfig
from lorax_core.model.layers import Projection, RotaryEmbedding
from lorax_core.ops import paged_attention_decode, paged_attention_decode_sgmv_shrink

# In a decode step with adapters whose o projection takes the fused NF4 ops (Projection.fused_nf4) and with counters
# for it, decode attention also does o's LoRA shrink (paged_attention_decode_sgmv_shrink): on CUDA the kernel that
# would start o's projection is gone. Read when a step runs, so CUDA graphs keep what they captured; off, o's
# nf4_linear_sgmv shrinks first (bench_engine.py's "o's shrink apart" rows).
SHRINK_O_IN_ATTENTION = True


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, qkv: nn.Module, o: nn.Module, rotary: RotaryEmbedding):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window = config.sliding_windows[layer]
        self.scale = self.head_dim**-0.5
        self.qkv = Projection(qkv, {"q_proj": config.q_size, "k_proj": config.kv_size, "v_proj": config.kv_size}, layer)
        self.o = Projection(o, {"o_proj": config.hidden_size}, layer)
        self.rotary = rotary
        self.k_cache = self.v_cache = torch.empty(0)  # [blocks, block_size, kv_heads, head_dim], set by the runner
        # int32 zeros shared by the layers (set by the runner on a GPU): decode attention merges its splits in the
        # split kernel's last CTA, not in a second kernel (paged_attention_decode), and sums o's shrink there
        self.counters: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext, shrunk: torch.Tensor | None = None) -> torch.Tensor:
        """shrunk: x's LoRA shrink for q, k, v when the norm before did it."""
        if self.qkv.fused_nf4(x.shape[0]):  # the projection, rotary and the cache write in one op
            q, k, v = self.qkv.rotated(x, ctx, self.rotary, (self.heads, self.kv_heads), self.k_cache, self.v_cache,
                                       shrunk)
        else:
            q, k, v = self.qkv(x, ctx, shrunk)
            q = q.view(-1, self.heads, self.head_dim)
            k = k.view(-1, self.kv_heads, self.head_dim)
            v = v.view(-1, self.kv_heads, self.head_dim)
            self.rotary(q, k, v, ctx.positions, self.k_cache, self.v_cache, ctx.slot_mapping)
        p = ctx.num_prefill_tokens
        o_shrunk = None  # out's LoRA shrink for o, when attention did it
        if p == 0:
            out, o_shrunk = self._decode(q, ctx, shrink_o=True)
        elif p == q.shape[0]:
            out = self._prefill(q, k, v, ctx)
        else:
            out = torch.cat([self._prefill(q[:p], k[:p], v[:p], ctx), self._decode(q[p:], ctx)[0]])
        return self.o(out.reshape(-1, self.heads * self.head_dim), ctx, o_shrunk)[0]

    def _decode(self, q: torch.Tensor, ctx: ForwardContext,
                shrink_o: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, its LoRA shrink for o or None); shrink_o: q holds every row of the step, so o may take the shrink
        from here (SHRINK_O_IN_ATTENTION)."""
        rows, counters = q.shape[0], self.counters
        if counters is not None and counters.numel() < rows * self.kv_heads:
            counters = None  # a batch larger than the runner planned for: the two-kernel merge
        lora = ctx.lora
        if (shrink_o and SHRINK_O_IN_ATTENTION and lora is not None and self.o.fused_nf4(rows) and counters is not None
                and counters.numel() >= rows * (self.kv_heads + 1)):
            return paged_attention_decode_sgmv_shrink(q, self.k_cache, self.v_cache, ctx.block_tables,
                                                      ctx.context_lens, self.scale, self.window, lora.pool,
                                                      self.o.layer, self.o.module_names, lora.seg_starts,
                                                      lora.seg_slots, counters)
        return paged_attention_decode(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale,
                                      self.window, counters), None

    def _prefill(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Causal attention of each prompt chunk over its sequence so far: the chunk itself when it starts the
        sequence, else the cached prefix read back through its slots (the chunk's keys are in the cache now)."""
        out = torch.empty_like(q)
        cu = ctx.cu_seqlens
        for b, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
            slots = ctx.prefix_slots[b]
            if slots is None:
                ks, vs = k[start:end], v[start:end]
            else:
                ks, vs = self.k_cache.flatten(0, 1)[slots], self.v_cache.flatten(0, 1)[slots]
            out[start:end] = self._attend(q[start:end], ks, vs, ctx.chunk_starts[b])
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int) -> torch.Tensor:
        """q [n, heads, D] at positions first.., k / v [first + n, kv_heads, D] at positions 0.. -> [n, heads, D]."""
        n, m = q.shape[0], k.shape[0]
        qs, ks, vs = (t.transpose(0, 1) for t in (q, k, v))  # [heads, len, D]
        if first == 0 and not (self.window and n > self.window):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            i = torch.arange(first, first + n, device=q.device)[:, None]
            j = torch.arange(m, device=q.device)[None, :]
            mask = (j <= i) & (i - j < self.window) if self.window else j <= i
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1)
