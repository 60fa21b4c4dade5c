"""Self-attention over the paged KV cache: SDPA over the new tokens at prefill, the paged op at decode."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax_core.model.context import ForwardContext
from lorax_core.model.config import ModelConfig
from lorax_core.model.layers import Projection, RotaryEmbedding
from lorax_core.ops import kv_cache_write, paged_attention_decode


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

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        q, k = self.rotary(q, k, ctx.positions)
        kv_cache_write(self.k_cache, self.v_cache, k, v, ctx.slot_mapping)
        if ctx.is_prefill:
            out = self._prefill(q, k, v, ctx.cu_seqlens)
        else:
            out = paged_attention_decode(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens,
                                         self.scale, self.window)
        return self.o(out.reshape(-1, self.heads * self.head_dim), ctx)[0]

    def _prefill(self, q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over themselves (whole prompts, no cached prefix)."""
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, n, D]
            n = end - start
            if self.window and n > self.window:
                i = torch.arange(n, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
        return out
