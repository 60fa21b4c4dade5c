"""Fake (meta) kernels: output shapes and dtypes of each op, for torch.compile, CUDA graphs and opcheck."""
import math

import torch


@torch.library.register_fake("lorax_core::nf4_quantize")
def _nf4_quantize(x, blocksize):
    n = x.numel()
    codes = x.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = x.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return codes, absmax


@torch.library.register_fake("lorax_core::nf4_quantize_absmax")
def _nf4_quantize_absmax(absmax, code, blocksize):
    n = absmax.numel()
    return absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty(((n + blocksize - 1) // blocksize,))


@torch.library.register_fake("lorax_core::nf4_dequantize_absmax")
def _nf4_dequantize_absmax(qabsmax, nested_code, nested_absmax, offset, nested_blocksize, part_starts=(),
                           part_offsets=()):
    return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)


@torch.library.register_fake("lorax_core::nf4_dequantize")
def _nf4_dequantize(codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, shape, dtype,
                    part_starts=(), part_offsets=()):
    torch._check(codes.numel() * 2 >= math.prod(shape))
    return codes.new_empty(shape, dtype=dtype)


@torch.library.register_fake("lorax_core::nf4_linear")
def _nf4_linear(x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, out_features, bias,
                part_starts=(), part_offsets=()):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lorax_core::nf4_linear_sgmv")
def _nf4_linear_sgmv(x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, out_features,
                     bias, arena, page_table, ranks, scales, seg_starts, seg_slots, v, layer, modules, columns,
                     page_size, silu_mul, part_starts=(), part_offsets=()):
    return x.new_empty((*x.shape[:-1], out_features // 2 if silu_mul else out_features))


@torch.library.register_fake("lorax_core::nf4_linear_sgmv_silu_shrink")
def _nf4_linear_sgmv_silu_shrink(x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
                                 out_features, bias, arena, page_table, ranks, scales, seg_starts, seg_slots, v, layer,
                                 modules, columns, page_size, next_modules, counters=None, part_starts=(),
                                 part_offsets=()):
    h = x.new_empty((x.shape[0], out_features // 2))
    return h, x.new_empty((x.shape[0], len(next_modules) * page_table.shape[4]), dtype=torch.float32)


@torch.library.register_fake("lorax_core::nf4_linear_sgmv_rotary")
def _nf4_linear_sgmv_rotary(x, codes, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
                            out_features, bias, arena, page_table, ranks, scales, seg_starts, seg_slots, v, layer,
                            modules, columns, page_size, q_heads, kv_heads, cos, sin, positions, k_cache, v_cache,
                            slot_mapping, part_starts=(), part_offsets=()):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("lorax_core::add_rms_norm_sgmv_shrink")
def _add_rms_norm_sgmv_shrink(x, residual, weight, eps, arena, page_table, ranks, seg_starts, seg_adapters, layer,
                              modules, page_size):
    v = x.new_empty((x.shape[0], len(modules) * page_table.shape[4]), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), v


@torch.library.register_fake("lorax_core::sgmv_shrink")
def _sgmv_shrink(x, arena, page_table, ranks, seg_starts, seg_adapters, layer, modules, page_size):
    return x.new_empty((x.shape[0], len(modules) * page_table.shape[4]), dtype=torch.float32)


@torch.library.register_fake("lorax_core::bgmv_shrink")
def _bgmv_shrink(x, arena, page_table, ranks, adapter_indices, layer, modules, page_size):
    return x.new_empty((x.shape[0], len(modules) * page_table.shape[4]), dtype=torch.float32)


@torch.library.register_fake("lorax_core::sgmv_expand")
def _sgmv_expand(y, v, arena, page_table, ranks, scales, seg_starts, seg_adapters, layer, modules, columns,
                 page_size):
    return None


@torch.library.register_fake("lorax_core::bgmv_expand")
def _bgmv_expand(y, v, arena, page_table, ranks, scales, adapter_indices, layer, modules, columns, page_size):
    return None


@torch.library.register_fake("lorax_core::sgmv")
def _sgmv(y, x, arena, page_table, ranks, scales, seg_starts, seg_adapters, layer, modules, columns, page_size):
    return None


@torch.library.register_fake("lorax_core::bgmv")
def _bgmv(y, x, arena, page_table, ranks, scales, adapter_indices, layer, modules, columns, page_size):
    return None


@torch.library.register_fake("lorax_core::kv_cache_write")
def _kv_cache_write(k_cache, v_cache, k, v, slot_mapping):
    return None


@torch.library.register_fake("lorax_core::paged_attention_decode")
def _paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, counters=None):
    return torch.empty_like(q)


@torch.library.register_fake("lorax_core::paged_attention_decode_sgmv_shrink")
def _paged_attention_decode_sgmv_shrink(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, arena,
                                        page_table, ranks, seg_starts, seg_adapters, layer, modules, page_size,
                                        counters=None):
    return torch.empty_like(q), q.new_empty((q.shape[0], len(modules) * page_table.shape[4]), dtype=torch.float32)


@torch.library.register_fake("lorax_core::rms_norm")
def _rms_norm(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("lorax_core::add_rms_norm")
def _add_rms_norm(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("lorax_core::rotary_embedding")
def _rotary_embedding(q, k, cos, sin, positions):
    return None


@torch.library.register_fake("lorax_core::rotary_kv_cache_write")
def _rotary_kv_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("lorax_core::silu_mul")
def _silu_mul(gate, up):
    return gate.new_empty(gate.shape)
