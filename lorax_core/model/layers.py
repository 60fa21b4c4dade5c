"""The math of a Llama-family layer: RMSNorm, rotary embeddings, and projections with per-row LoRA."""
from __future__ import annotations

import torch
from torch import nn

from lorax_core.model.context import ForwardContext
from lorax_core.ops import add_rms_norm, add_rms_norm_sgmv_shrink, nf4_linear_sgmv, nf4_linear_sgmv_rotary, rms_norm
from lorax_core.ops import nf4_linear_sgmv_silu_shrink, rotary_kv_cache_write
from lorax_core.ops import silu_mul as silu_mul_op
from lorax_core.quant.nf4 import NF4Linear

# NF4 projections of up to FUSED_NF4_MAX_ROWS rows go through nf4_linear_sgmv: on CUDA its GEMV adds the LoRA
# delta and SwiGLU (gate | up) or rotary and the KV cache write (q | k | v: nf4_linear_sgmv_rotary) in its
# epilogue, and at one row the norm before them does their LoRA shrink (add_rms_norm_sgmv_shrink); with adapters in
# the step, gate | up's op also shrinks its output for down (nf4_linear_sgmv_silu_shrink). Otherwise, or
# with FUSED_NF4 False: add_rms_norm, nf4_linear, sgmv, silu_mul and rotary_kv_cache_write one after the other
# (bench_engine.py's baseline row; the same results off those paths). Read when a step runs, so CUDA graphs keep
# what they captured. On an H100 (2026-11-24, bench/RESULTS.md) the fusions took a batch-1 decode step from 7.18
# to 4.80 ms but a batch-8 one from 9.90 to 11.08 ms. The GEMV's 8-row instance, which serves 5 to 8 rows, spills
# 204-244 bytes of registers with the LoRA epilogue (ptxas, sm_90); its 1-, 2- and 4-row ones 0-52. 2 and 4 rows
# are not measured yet.
FUSED_NF4 = True
FUSED_NF4_MAX_ROWS = 4


class RMSNorm(nn.Module):
    """transformers' RMSNorm (normalize in fp32, scale in x's dtype), with the residual add before it fused in."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def before(self, projection: Projection, x: torch.Tensor, residual: torch.Tensor, ctx: ForwardContext):
        """(norm(x + residual), x + residual, the LoRA shrink of the first for `projection` or None): the shrink
        where the projection asks for it (Projection.shrinks_in_norm), in the norm's kernel."""
        if not projection.shrinks_in_norm(x.shape[0], ctx):
            return (*self(x, residual), None)
        lora = ctx.lora
        return add_rms_norm_sgmv_shrink(x, residual, self.weight, self.eps, lora.pool, projection.layer,
                                        projection.module_names, lora.seg_starts, lora.seg_slots)


class RotaryEmbedding(nn.Module):
    """cos / sin tables for every position up to max_positions, from the config's RoPE parameters."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, device, dtype: torch.dtype):
        super().__init__()
        inv_freq, scaling = rope_frequencies(hf_config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [positions, head_dim]
        # transformers rounds the tables to the activation dtype before use; so do we
        self.register_buffer("cos", (emb.cos() * scaling).to(device, dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device, dtype), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Rotate q [T, heads, D] and k [T, kv_heads, D] in place by positions [T], then store k and v in their KV
        cache slots (one op: one kernel on CUDA)."""
        rotary_kv_cache_write(q, k, v, self.cos, self.sin, positions, k_cache, v_cache, slot_mapping)


def rope_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the attention scaling of the config's rope_type (transformers'
    own RoPE init functions for the scaled types, so linear / llama3 / yarn / longrope match it exactly)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:  # transformers 4.x spells them rope_theta + rope_scaling
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dims = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (params["rope_theta"] ** dims), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' (NTK scaling that changes with the sequence length) is not supported; "
                         "use a model without rope_scaling, or 'linear', 'llama3', 'yarn' or 'longrope'")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class Projection(nn.Module):
    """One base linear (dense or NF4) whose output is the concatenation of `parts` (e.g. q, k, v), plus each
    row's LoRA delta per part: `outs[i] = x @ W_i.T (+ b_i) + scale[a] * (x @ A_i[a].T) @ B_i[a].T`."""

    def __init__(self, base: nn.Module, parts: dict[str, int], layer: int):
        super().__init__()
        self.base = base
        self.parts = parts  # PEFT module name -> output features, in output order
        self.module_names = list(parts)
        self.layer = layer

    def forward(self, x: torch.Tensor, ctx: ForwardContext, v: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The parts' outputs; v: x's LoRA shrink when the norm before did it (shrinks_in_norm)."""
        y = self._output(x, ctx, silu_mul=False, v=v)
        return list(y.split(list(self.parts.values()), dim=-1)) if len(self.parts) > 1 else [y]

    def activated(self, x: torch.Tensor, ctx: ForwardContext, v: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU's silu(gate) * up of a projection whose two parts are gate and up."""
        return self._output(x, ctx, silu_mul=True, v=v)

    def activated_shrinking(self, x: torch.Tensor, ctx: ForwardContext, v: torch.Tensor | None, after: Projection,
                            counters: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(activated(x), its LoRA shrink for the projection `after` that reads it), in one op
        (nf4_linear_sgmv_silu_shrink: on CUDA the GEMV's epilogue shrinks too, with counters): the v for after(h, ctx,
        v). Needs fused_nf4 and adapters in the step (ctx.lora)."""
        return nf4_linear_sgmv_silu_shrink(x, **self._nf4_args(x, ctx), next_modules=after.module_names, v=v,
                                           counters=counters)

    def fused_nf4(self, rows: int) -> bool:
        """Whether the fused NF4 ops serve this projection of `rows` rows (its output, `rotated`): NF4 weights,
        FUSED_NF4 on, at most FUSED_NF4_MAX_ROWS rows."""
        return FUSED_NF4 and isinstance(self.base, NF4Linear) and rows <= FUSED_NF4_MAX_ROWS

    def rotated(self, x: torch.Tensor, ctx: ForwardContext, rotary: RotaryEmbedding, heads: tuple[int, int],
                k_cache: torch.Tensor, v_cache: torch.Tensor, v: torch.Tensor | None = None) -> list[torch.Tensor]:
        """q, k, v [T, heads, D] of a fused q | k | v projection with q and k rotated and k and v stored in the KV
        cache: this projection then RotaryEmbedding in one op (nf4_linear_sgmv_rotary: on CUDA, for up to 8 rows, in
        the GEMV's epilogue). heads: (q heads, kv heads)."""
        y = nf4_linear_sgmv_rotary(x, **self._nf4_args(x, ctx), v=v, q_heads=heads[0], kv_heads=heads[1],
                                   cos=rotary.cos, sin=rotary.sin, positions=ctx.positions, k_cache=k_cache,
                                   v_cache=v_cache, slot_mapping=ctx.slot_mapping)
        return [part.view(x.shape[0], -1, rotary.cos.shape[1]) for part in y.split(list(self.parts.values()), dim=-1)]

    def shrinks_in_norm(self, rows: int, ctx: ForwardContext) -> bool:
        """Whether the norm before this projection should do its LoRA shrink too (add_rms_norm_sgmv_shrink): one
        row (a batch-1 decode step, where a kernel less counts) of a projection the fused NF4 ops serve (fused_nf4),
        with adapters in the step."""
        return rows == 1 and ctx.lora is not None and self.fused_nf4(rows)

    def _nf4_args(self, x: torch.Tensor, ctx: ForwardContext) -> dict:
        """nf4_linear_sgmv's (and nf4_linear_sgmv_rotary's) weight, bias and LoRA arguments for this projection."""
        bias = self.base.bias.to(x.dtype) if self.base.bias is not None else None
        lora = ctx.lora
        if lora is None:
            return dict(w=self.base.weight, bias=bias, pool=None, layer=0, modules=(), seg_starts=None, seg_slots=None)
        return dict(w=self.base.weight, bias=bias, pool=lora.pool, layer=self.layer, modules=self.module_names,
                    seg_starts=lora.seg_starts, seg_slots=lora.seg_slots)

    def _output(self, x: torch.Tensor, ctx: ForwardContext, silu_mul: bool, v: torch.Tensor | None) -> torch.Tensor:
        if self.fused_nf4(x.shape[0]):
            return nf4_linear_sgmv(x, **self._nf4_args(x, ctx), silu_mul=silu_mul, v=v)
        if v is not None:
            raise ValueError("a LoRA shrink done in the norm needs an NF4 projection (nf4_linear_sgmv)")
        y = self.base(x)
        if ctx.lora is not None:  # one shrink and one expand for all parts, updating y's columns in place
            ctx.lora.apply(y, x, self.layer, self.module_names)
        if silu_mul:
            gate, up = y.split(list(self.parts.values()), dim=-1)
            return silu_mul_op(gate, up)
        return y
