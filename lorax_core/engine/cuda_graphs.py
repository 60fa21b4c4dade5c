"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once, over static input
tensors that each step fills in. Padded rows have no KV slot, no context and no adapter segment, so they
write nothing and read nothing."""
from __future__ import annotations

import torch

from lorax_core.adapters import AdapterPool
from lorax_core.model.context import ForwardContext, LoraBatch
from lorax_core.model.llama import CausalLM


def buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: CausalLM, pool: AdapterPool, max_batch: int, max_blocks: int):
        self.model, self.sizes = model, buckets(max_batch)
        dev = next(model.parameters()).device
        zeros = lambda *shape, dtype=torch.int32: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.input_ids, self.positions = zeros(max_batch, dtype=torch.long), zeros(max_batch, dtype=torch.long)
        self.slot_mapping = zeros(max_batch, dtype=torch.long) - 1
        self.block_tables, self.context_lens = zeros(max_batch, max_blocks), zeros(max_batch)
        self.seg_starts, self.seg_slots = zeros(max_batch + 1), zeros(max_batch) - 1
        self.pool = pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _context(self, bs: int) -> ForwardContext:
        lora = LoraBatch(self.pool, self.seg_starts[: bs + 1], self.seg_slots[:bs])
        return ForwardContext(positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
                              block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs], lora=lora)

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            ctx = self._context(bs)
            self.model(self.input_ids[:bs], ctx)  # warm up (lazy inits, cuBLAS handles) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self.outputs[bs] = self.model(self.input_ids[:bs], ctx)
            memory_pool = memory_pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, batch: int, width: int) -> bool:
        return batch <= self.sizes[-1] and width <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step built by the model runner (B <= the largest bucket)."""
        b = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        self.input_ids[:b] = input_ids
        self.positions[:b] = ctx.positions
        self.positions[b:bs] = 0
        self.slot_mapping[:b] = ctx.slot_mapping
        self.slot_mapping[b:bs] = -1
        self.block_tables[:bs] = 0
        self.block_tables[:b, : ctx.block_tables.shape[1]] = ctx.block_tables
        self.context_lens[:b] = ctx.context_lens
        self.context_lens[b:bs] = 0
        self.seg_slots[:bs] = -1
        self.seg_starts[:bs + 1] = b
        if ctx.lora is None:
            self.seg_starts[0] = 0
        else:
            n = ctx.lora.seg_slots.shape[0]
            self.seg_starts[: n + 1] = ctx.lora.seg_starts
            self.seg_slots[:n] = ctx.lora.seg_slots
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
