"""What the model reads during one forward step; built by the model runner, never by the model."""
from __future__ import annotations

import dataclasses

import torch

from lorax_core.adapters.pool import AdapterPool
from lorax_core.ops import sgmv


@dataclasses.dataclass
class LoraBatch:
    """Which adapter each row uses, as segments of consecutive rows sharing one (the model runner orders rows by
    adapter once per step). Prefill and decode both run SGMV over these segments: with rows already grouped,
    BGMV's per-call grouping of tokens by adapter would be repeated work in each of the 7 x layers LoRA calls."""

    pool: AdapterPool
    seg_starts: torch.Tensor  # int32 [S + 1]: segment s is rows [seg_starts[s], seg_starts[s + 1])
    seg_slots: torch.Tensor  # int32 [S]: its pool slot, -1 = base model

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, modules: list[str]) -> None:
        """y += each row's LoRA delta for (layer, each module), in place; y holds the modules' outputs side by side."""
        sgmv(y, x, self.pool, layer, modules, self.seg_starts, self.seg_slots)


@dataclasses.dataclass
class ForwardContext:
    """Rows [0, num_prefill_tokens) are prefill chunks, the rest decode rows (one token each)."""

    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]: KV cache slot of each token
    num_prefill_tokens: int = 0
    cu_seqlens: list[int] | None = None  # prefill chunk b is rows [cu[b], cu[b + 1])
    chunk_starts: list[int] | None = None  # chunk b's first position (tokens of its sequence already cached)
    prefix_slots: list[torch.Tensor | None] | None = None  # chunk b after a cached prefix: int64 cache slots of
    # positions [0, chunk end), to read the prefix back; None for a chunk that starts the sequence
    block_tables: torch.Tensor | None = None  # decode rows: int32 [B, max_blocks]
    context_lens: torch.Tensor | None = None  # decode rows: int32 [B]
    lora: LoraBatch | None = None  # None: no row of this step uses an adapter
    logits_indices: torch.Tensor | None = None  # int64 [S]: the rows whose logits are needed
