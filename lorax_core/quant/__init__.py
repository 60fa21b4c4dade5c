"""Quantized weights: NF4 (bitsandbytes-compatible 4-bit NormalFloat)."""
from lorax_core.quant.nf4 import NF4Linear, NF4Weight

__all__ = ["NF4Linear", "NF4Weight"]
