"""NF4 weights in the bitsandbytes layout, and a drop-in `nn.Linear` replacement that runs on them.

The layout is bitsandbytes' own, byte for byte, so QLoRA adapters see the exact base they were trained on:
codes are the flattened row-major weight, two 4-bit codes per byte (element 2i in the high nibble), one fp32
absmax per block of `blocksize` elements, optionally double-quantized (8-bit, blocks of 256, plus an offset). A
fused projection (`NF4Weight.cat`) keeps its parts' double quantization, each part with its own offset.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import torch
from torch import nn

from lorax_core.ops import nf4 as nf4_ops
from lorax_core.ops.reference import NF4_VALUES, dynamic_map

_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
MAX_ABSMAX_PARTS = 3  # kMaxAbsmaxParts (csrc/nf4/nf4_table.h): parts with their own offset in one weight


@dataclasses.dataclass
class NF4Weight:
    """A 4-bit NF4 weight `[out, in]` (or any shape) with its quantization state."""

    codes: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original weight, and the default dequantize dtype
    blocksize: int = 64
    nested_code: torch.Tensor | None = None  # fp32 [256], the 8-bit code book of the absmax
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(blocks / nested_blocksize)]
    offset: float = 0.0  # mean absmax, added back after the 8-bit dequantization (an fp32 value)
    nested_blocksize: int = 256
    # A fused weight's parts after the first (cat): the absmax block each starts at, and its offset (in place of
    # `offset` from there on). Empty for a weight as bitsandbytes stores it.
    part_starts: tuple[int, ...] = ()
    part_offsets: tuple[float, ...] = ()

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        numel = math.prod(self.shape)
        if self.blocksize not in _BLOCKSIZES:
            raise ValueError(f"NF4 blocksize must be one of {_BLOCKSIZES}, got {self.blocksize}")
        if self.codes.dtype != torch.uint8 or self.codes.numel() != (numel + 1) // 2:
            raise ValueError(
                f"NF4 codes must be uint8 with {(numel + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.codes.dtype} with {self.codes.numel()}"
            )
        blocks = (numel + self.blocksize - 1) // self.blocksize
        if self.absmax.numel() != blocks:
            raise ValueError(f"NF4 absmax must have {blocks} entries (blocksize {self.blocksize}), got {self.absmax.numel()}")
        if (self.nested_code is None) != (self.nested_absmax is None):
            raise ValueError("a double-quantized NF4 weight needs both nested_code and nested_absmax")
        self.part_starts, self.part_offsets = tuple(self.part_starts), tuple(self.part_offsets)
        if self.part_starts or self.part_offsets:
            starts = (0, *self.part_starts)
            if (self.nested_code is None or len(self.part_starts) != len(self.part_offsets)
                    or len(starts) > MAX_ABSMAX_PARTS or any(b <= a for a, b in itertools.pairwise(starts))
                    or starts[-1] >= blocks or any(s % self.nested_blocksize for s in starts)):
                raise ValueError(f"NF4 part_starts {self.part_starts} / part_offsets {self.part_offsets}: a "
                                 f"double-quantized weight's parts start at increasing multiples of its nested "
                                 f"blocksize {self.nested_blocksize} below its {blocks} blocks, one offset each, at "
                                 f"most {MAX_ABSMAX_PARTS} parts")
        self.codes = self.codes.reshape(-1)
        self.absmax = self.absmax.reshape(-1)

    # construction ----------------------------------------------------------------------------------------
    @classmethod
    def quantize(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
        """Quantize a float weight exactly as `bitsandbytes.functional.quantize_4bit(w, blocksize,
        compress_statistics=double_quant, quant_type="nf4")` does."""
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"NF4 quantizes float32, float16 or bfloat16 weights, got {w.dtype}")
        if blocksize not in _BLOCKSIZES:
            raise ValueError(f"NF4 blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
        codes, absmax = torch.ops.lorax_core.nf4_quantize(w.detach(), blocksize)
        if not double_quant:
            return cls(codes, absmax, w.shape, w.dtype, blocksize)
        offset = absmax.mean()
        code2 = dynamic_map().to(w.device)
        qabsmax, absmax2 = torch.ops.lorax_core.nf4_quantize_absmax(absmax - offset, code2, 256)
        return cls(codes, qabsmax, w.shape, w.dtype, blocksize, code2, absmax2, float(offset), 256)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From `bitsandbytes.functional.quantize_4bit` output (or a `Params4bit`'s data and quant_state)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, this weight is {quant_state.quant_type}")
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be any dtype: the bytes are the same
            packed = packed.view(torch.uint8)
        if quant_state.nested:
            s2 = quant_state.state2
            return cls(packed, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize,
                       s2.code.float(), s2.absmax.float(), float(quant_state.offset), s2.blocksize)
        return cls(packed, quant_state.absmax.float(), quant_state.shape, quant_state.dtype, quant_state.blocksize)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """From the keys transformers saves for a bitsandbytes 4-bit linear: `{prefix}weight`,
        `weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4` and, when double-quantized,
        `weight.nested_absmax`, `weight.nested_quant_map`."""
        key = f"{prefix}weight"
        if f"{key}.{_QUANT_STATE_KEY}" not in state_dict:
            raise ValueError(f"{key} is not a bitsandbytes NF4 weight: {key}.{_QUANT_STATE_KEY} is missing")
        meta = json.loads(bytes(state_dict[f"{key}.{_QUANT_STATE_KEY}"].cpu().tolist()).decode("utf-8"))
        quant_map = state_dict[f"{key}.quant_map"].float().cpu()
        if not torch.equal(quant_map, NF4_VALUES):
            raise ValueError(f"{key}: its quant_map is not the NF4 code book")
        common = dict(
            codes=state_dict[key].reshape(-1).view(torch.uint8),
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
        )
        if f"{key}.nested_absmax" in state_dict:
            return cls(absmax=state_dict[f"{key}.absmax"], nested_code=state_dict[f"{key}.nested_quant_map"].float(),
                       nested_absmax=state_dict[f"{key}.nested_absmax"].float(), offset=float(meta["nested_offset"]),
                       nested_blocksize=int(meta["nested_blocksize"]), **common)
        return cls(absmax=state_dict[f"{key}.absmax"].float(), **common)

    @classmethod
    def cat(cls, weights: list[NF4Weight], keep_double_quant: bool = True) -> NF4Weight:
        """Stack 2-D weights `[out_i, in]` along the output dimension (fused q/k/v or gate/up projections).

        The codes and every block's absmax value are kept exactly, so the result computes what the parts do. The
        absmax stays double-quantized when it can (keep_double_quant, every part double-quantized with one nested
        code book and blocksize, each part but the last ending on a nested block, at most MAX_ABSMAX_PARTS parts):
        each part keeps its offset (part_starts / part_offsets). Otherwise it is stored in fp32, 4 bytes a block
        instead of about 1: 12.5% more than the codes at blocksize 64, not 3%.
        """
        if len(weights) == 1:
            return weights[0]
        first = weights[0]
        for w in weights:
            if len(w.shape) != 2 or w.shape[1] != first.shape[1] or (w.blocksize, w.dtype) != (first.blocksize, first.dtype):
                raise ValueError("NF4Weight.cat needs 2-D weights with the same in_features, blocksize and dtype")
            if w.codes.numel() * 2 % w.blocksize:
                raise ValueError(f"NF4Weight.cat: a part of shape {tuple(w.shape)} does not end on a block boundary "
                                 f"(blocksize {w.blocksize}); keep that projection unfused")
        codes = torch.cat([w.codes for w in weights])
        shape = (sum(w.shape[0] for w in weights), first.shape[1])
        if keep_double_quant and cls._nested_parts_fit(weights):
            starts = [0]
            for w in weights[:-1]:
                starts.append(starts[-1] + w.absmax.numel())
            return cls(codes, torch.cat([w.absmax for w in weights]), shape, first.dtype, first.blocksize,
                       first.nested_code, torch.cat([w.nested_absmax for w in weights]), first.offset,
                       first.nested_blocksize, tuple(starts[1:]), tuple(w.offset for w in weights[1:]))
        absmax = torch.cat([w.absmax_fp32() for w in weights])
        return cls(codes, absmax, shape, first.dtype, first.blocksize)

    @staticmethod
    def _nested_parts_fit(weights: list[NF4Weight]) -> bool:
        """Whether cat can keep these parts' double quantization, each part with its own offset."""
        first = weights[0]
        return (len(weights) <= MAX_ABSMAX_PARTS
                and all(w.double_quant and not w.part_starts and w.nested_blocksize == first.nested_blocksize
                        and torch.equal(w.nested_code, first.nested_code) for w in weights)
                and all(w.absmax.numel() % w.nested_blocksize == 0 for w in weights[:-1]))

    # export ------------------------------------------------------------------------------------------------
    def to_bnb(self):
        """`(packed uint8 [numel/2, 1], bitsandbytes QuantState)`, as `quantize_4bit` returns them."""
        if self.part_starts:
            raise ValueError("this NF4 weight fuses parts with their own offsets, which one bitsandbytes QuantState "
                             "cannot hold: export the parts before NF4Weight.cat")
        from bitsandbytes.functional import QuantState

        code = NF4_VALUES.to(self.codes.device)
        state2 = None
        offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
            offset = torch.tensor(self.offset, dtype=torch.float32, device=self.codes.device)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=self.dtype, offset=offset, state2=state2)
        return self.codes.reshape(-1, 1), state

    # use ---------------------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_code is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes and quantization state (what a kernel reads)."""
        tensors = [self.codes, self.absmax, self.nested_code, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32 [blocks] (double quantization undone)."""
        if not self.double_quant:
            return self.absmax.float()
        return torch.ops.lorax_core.nf4_dequantize_absmax(
            self.absmax, self.nested_code, self.nested_absmax, self.offset, self.nested_blocksize,
            list(self.part_starts), list(self.part_offsets)
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_ops.nf4_dequantize(self, dtype)

    def to(self, device) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, codes=move(self.codes), absmax=move(self.absmax),
                                   nested_code=move(self.nested_code), nested_absmax=move(self.nested_absmax))


class NF4Linear(nn.Module):
    """A drop-in for `nn.Linear` whose weight is NF4: `y = x @ dequantize(W).T + b`. The weight is frozen."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        return cls(NF4Weight.quantize(linear.weight, blocksize, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nf4_ops.nf4_linear(x, self.weight, bias)

    def _apply(self, fn, recurse=True):  # .to(device) / .cuda() move the quantized weight too
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return self

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={w.blocksize}, double_quant={w.double_quant}")
