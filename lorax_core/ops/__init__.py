"""Thin Python wrappers over `torch.ops.lorax_core`; each docstring's Semantics block is the reference math.

`lorax_core.ops.reference` holds the plain-PyTorch reference of every op (the spec the tests check against).
"""
from lorax_core.ops.attention import kv_cache_write, paged_attention_decode, paged_attention_decode_sgmv_shrink
from lorax_core.ops.layers import add_rms_norm, rms_norm, rotary_embedding, rotary_kv_cache_write, silu_mul
from lorax_core.ops.lora import add_rms_norm_sgmv_shrink, bgmv, sgmv
from lorax_core.ops.nf4 import nf4_dequantize, nf4_linear, nf4_linear_sgmv, nf4_linear_sgmv_rotary
from lorax_core.ops.nf4 import nf4_linear_sgmv_silu_shrink

__all__ = ["add_rms_norm", "add_rms_norm_sgmv_shrink", "bgmv", "kv_cache_write", "nf4_dequantize", "nf4_linear",
           "nf4_linear_sgmv", "nf4_linear_sgmv_rotary", "nf4_linear_sgmv_silu_shrink", "paged_attention_decode",
           "paged_attention_decode_sgmv_shrink", "rms_norm", "rotary_embedding", "rotary_kv_cache_write", "sgmv",
           "silu_mul"]
