"""The Llama-family decoder (Llama, Mistral, Qwen2): embeddings, layers of attention + SwiGLU MLP, norm, lm_head.

The model only does math: which rows use which adapter, where their keys go and which logits are needed all
come from the per-step ForwardContext.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorax_core.model.context import ForwardContext
from lorax_core.model.attention import Attention
from lorax_core.model.config import ModelConfig
from lorax_core.model.layers import Projection, RMSNorm


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        size = config.intermediate_size
        self.gate_up = Projection(gate_up, {"gate_proj": size, "up_proj": size}, layer)
        self.down = Projection(down, {"down_proj": config.hidden_size}, layer)
        # int32 zeros shared by the layers (set by the runner on a GPU, as attention's): the gate | up GEMV's CTAs
        # count themselves in when its epilogue does down's LoRA shrink (Projection.activated_shrinking)
        self.counters: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext, shrunk: torch.Tensor | None = None) -> torch.Tensor:
        """shrunk: x's LoRA shrink for gate and up when the norm before did it."""
        rows = x.shape[0]
        if ctx.lora is not None and self.gate_up.fused_nf4(rows) and self.down.fused_nf4(rows):
            h, v = self.gate_up.activated_shrinking(x, ctx, shrunk, self.down, self.counters)
            return self.down(h, ctx, v)[0]
        return self.down(self.gate_up.activated(x, ctx, shrunk), ctx)[0]


class DecoderLayer(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm):
        super().__init__()
        self.attn, self.mlp, self.input_norm, self.post_norm = attn, mlp, input_norm, post_norm

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        """h: the previous layer's MLP output, residual: the hidden state before it (None for the first layer,
        whose h is the embedding). Returns this layer's (MLP output, residual): each residual add is fused into
        the norm that follows it."""
        if residual is None:
            x, residual, shrunk = self.input_norm(h), h, None
        else:
            x, residual, shrunk = self.input_norm.before(self.attn.qkv, h, residual, ctx)
        x, residual, shrunk = self.post_norm.before(self.mlp.gate_up, self.attn(x, ctx, shrunk), residual, ctx)
        return self.mlp(x, ctx, shrunk), residual


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: torch.Tensor):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)  # [vocab, hidden]; may share the embedding

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        h, residual = self.embed(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, ctx)
        return self.norm(h, residual)[0] if residual is not None else self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
