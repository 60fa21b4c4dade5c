"""Plain-PyTorch references of the compiled ops: the spec that the CPU and CUDA kernels are tested against.

Written for clarity, not speed. NF4 follows bitsandbytes byte for byte (DESIGN.md, "NF4 format").
"""
from __future__ import annotations

import torch

NF4_VALUES = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code book (create_dynamic_map()), sorted, float32 [256]."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [ceil(n/2)] (element 2i in the high nibble), absmax fp32 [ceil(n/blocksize)]."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax, scaled = [], []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        am = blocks.abs().amax(dim=1)
        absmax.append(am)
        scaled.append((blocks * (1.0 / am.clamp(min=1e-38))[:, None]).reshape(-1))
    if n > full:  # the tail block divides, and keeps its clamped absmax
        am = flat[full:].abs().amax().clamp(min=1e-38)
        absmax.append(am[None])
        scaled.append(flat[full:] / am)
    scaled = torch.cat(scaled).clamp(-1, 1)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / 2
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], torch.cat(absmax)


def nf4_quantize_absmax(absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit blockwise quantization of the (centred) absmax, as bitsandbytes' CPU kernel does it.

    Each value is scaled by 1/absmax2 of its block, rounded onto a grid of 65536 points over [-1, 1]
    (index trunc(fma((v + 1) / 2, 65535, 0.5))), and takes the code of that grid point: the number of code-book
    midpoints below it. An all-zero block gets code 0. Returns (q uint8 [n], absmax2 fp32 [blocks]).
    """
    n = absmax.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([absmax.float(), absmax.new_zeros(pad)]).reshape(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / absmax2)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    t = ((v + 1.0) * 0.5).double() * 65535.0 + 0.5  # exact in float64, then one rounding to float32 = fma
    index = t.float().to(torch.int64) & 0xFFFF
    grid = (index.float() + index.float()) / 65535.0 - 1.0
    mids = (code[:-1] + code[1:]) * 0.5
    q = torch.searchsorted(mids, grid, right=False)  # midpoints strictly below the grid point
    zero_block = (absmax2 == 0).repeat_interleave(blocksize)[:n]
    return torch.where(zero_block, 0, q).to(torch.uint8), absmax2


def nf4_dequantize_absmax(q: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: float, blocksize: int,
                          part_starts=(), part_offsets=()):
    """absmax[b] = code[q[b]] * absmax2[b // blocksize] + the offset of b's part (fp32, two roundings): offset, or
    part_offsets[j] from block part_starts[j] on."""
    idx = torch.arange(q.numel(), device=q.device)
    offsets = torch.full((q.numel(),), offset, dtype=torch.float32, device=q.device)
    for start, part_offset in zip(part_starts, part_offsets, strict=True):
        offsets[start:] = part_offset
    return code[q.long()] * absmax2[idx // blocksize] + offsets


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype,
                   values_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp32 absmax [blocks]; out = NF4[code] * absmax[i // blocksize] in fp32, cast to dtype. With `values_dtype`
    (fp16 / bf16) the NF4 values are rounded to it first: the weights the one-row CUDA GEMV multiplies by, in
    fp32."""
    n = 1
    for d in shape:
        n *= d
    q = torch.stack([codes >> 4, codes & 0xF], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n, device=codes.device) // blocksize
    values = NF4_VALUES.to(values_dtype).float().to(codes.device)
    return (values[q] * absmax[block]).to(dtype).reshape(shape)


def nf4_linear(x: torch.Tensor, w_dequantized: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias), in fp32."""
    y = x.float() @ w_dequantized.float().T
    return y + bias.float() if bias is not None else y


def lora_delta(y: torch.Tensor, x: torch.Tensor, slots: list[int], weights: dict[int, tuple], scales: dict[int, float]):
    """y + per-token LoRA delta, in fp32: y[t] += scale[a] * (x[t] @ A.T) @ B.T for a = slots[t] (-1: none).

    weights[a] = (A [r, in], B [out, r]) dense, as PEFT stores them (lora_A.weight, lora_B.weight).
    """
    out = y.float().clone()
    for t, a in enumerate(slots):
        if a >= 0:
            a_w, b_w = weights[a]
            out[t] += scales[a] * (x[t].float() @ a_w.float().T) @ b_w.float().T
    return out


def nf4_linear_sgmv(x: torch.Tensor, w_dequantized: torch.Tensor, bias: torch.Tensor | None, slots: list[int],
                    weights: dict[int, tuple], scales: dict[int, float], silu_mul: bool) -> torch.Tensor:
    """nf4_linear + lora_delta (slots[t]: row t's adapter, -1 none; weights[a] = (A, B) of the output's columns),
    then silu(gate) * up of the halves, all in fp32."""
    y = lora_delta(nf4_linear(x, w_dequantized, bias), x, slots, weights, scales)
    if not silu_mul:
        return y
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def nf4_linear_sgmv_rotary(x: torch.Tensor, w_dequantized: torch.Tensor, bias: torch.Tensor | None, slots: list[int],
                           weights: dict[int, tuple], scales: dict[int, float], q_heads: int, kv_heads: int,
                           cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """nf4_linear_sgmv (fp32), then rotary_kv_cache_write of its q, k, v heads; returns y with q and k rotated."""
    y = nf4_linear_sgmv(x, w_dequantized, bias, slots, weights, scales, silu_mul=False)
    d = y.shape[1] // (q_heads + 2 * kv_heads)
    q, k, v = (part.view(y.shape[0], -1, d) for part in y.split([q_heads * d, kv_heads * d, kv_heads * d], dim=1))
    rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    return y


def add_rms_norm_sgmv_shrink(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             slots: list[int], a_weights: list[dict[int, torch.Tensor]], max_rank: int):
    """add_rms_norm, then v[t, i * max_rank : i * max_rank + r] = out[t] @ A_i.T for row t's adapter a = slots[t]
    (-1: none; a_weights[i][a] = A_i [r, in] of module i, absent: rank 0), fp32; v's other columns zero."""
    out, s = add_rms_norm(x, residual, weight, eps)
    return out, s, lora_shrink(out, slots, a_weights, max_rank)


def lora_shrink(x: torch.Tensor, slots: list[int], a_weights: list[dict[int, torch.Tensor]], max_rank: int):
    """v[t, i * max_rank : i * max_rank + r] = x[t] @ A_i.T for row t's adapter a = slots[t] (-1: none;
    a_weights[i][a] = A_i [r, in] of module i, absent: rank 0), fp32; v's other columns zero."""
    v = torch.zeros(x.shape[0], len(a_weights) * max_rank)
    for t, a in enumerate(slots):
        for i, per_slot in enumerate(a_weights):
            if a >= 0 and a in per_slot:
                a_w = per_slot[a].float()
                v[t, i * max_rank:i * max_rank + a_w.shape[0]] = x[t].float() @ a_w.T
    return v


def kv_cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store k[t], v[t] ([T, kv_heads, head_dim]) at slot slot_mapping[t] of the caches; slots < 0 are skipped."""
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            flat_k[slot], flat_v[slot] = k[t], v[t]


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """Attention of one query token per sequence over its cached positions, in fp32 (returns q's dtype)."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        positions = torch.arange(length)
        if sliding_window:
            positions = positions[-sliding_window:]
        slots = block_tables[b].long().cpu()[positions // block_size] * block_size + positions % block_size
        keys = k_cache.flatten(0, 1)[slots.to(k_cache.device)].float()  # [len, kv_heads, D]
        values = v_cache.flatten(0, 1)[slots.to(k_cache.device)].float()
        group = q.shape[1] // kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [len, heads, D]
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[b].float() * scale, keys), dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, values).to(q.dtype)
    return out


def paged_attention_decode_sgmv_shrink(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                       sliding_window: int, slots: list[int], a_weights: list[dict[int, torch.Tensor]],
                                       max_rank: int):
    """paged_attention_decode, then lora_shrink of its output flattened to [B, heads * head_dim]."""
    out = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    return out, lora_shrink(out.flatten(1), slots, a_weights, max_rank)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, round to x's dtype, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add that precedes each norm in a decoder layer."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor) -> None:
    """transformers' apply_rotary_pos_emb (rotate_half layout) on q, k [T, heads, D], in place."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_(x * c + torch.cat((-x2, x1), dim=-1) * s)


def rotary_kv_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """rotary_embedding on q and k, then kv_cache_write of the rotated k and v."""
    rotary_embedding(q, k, cos, sin, positions)
    kv_cache_write(k_cache, v_cache, k, v, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation as transformers computes it: silu(gate) * up in the activation dtype."""
    return torch.nn.functional.silu(gate) * up
