"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once, over static input
tensors that each step fills in. Padded rows have no KV slot, no context and no adapter segment, so they
write nothing and read nothing.

Each bucket's static inputs are views of one device buffer (step_inputs.Layout), so a step fills them with one
host-to-device copy, padding included, and no copy kernels. With `capture=False` nothing is captured and `run`
calls the model eagerly on the same static inputs: what a replay computes, on any device (the CPU tests use it).
"""
from __future__ import annotations

import torch

from lorax_core.adapters import AdapterPool
from lorax_core.engine.step_inputs import Layout, StepBatch, fill_pending
from lorax_core.model.context import ForwardContext, LoraBatch
from lorax_core.model.llama import CausalLM


def buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


def layout(bs: int, max_blocks: int) -> Layout:
    """A bucket's static inputs: bs rows, block tables as wide as the longest context allowed."""
    long, int32 = torch.int64, torch.int32
    return Layout([("input_ids", long, (bs,)), ("positions", long, (bs,)), ("slots", long, (bs,)),
                   ("logits", long, (bs,)), ("context_lens", int32, (bs,)), ("seg_starts", int32, (bs + 1,)),
                   ("pending_rows", long, (bs,)), ("pending_from", long, (bs,)), ("seg_slots", int32, (bs,)),
                   ("block_tables", int32, (bs, max_blocks))])


class Bucket:
    """The static inputs of one batch size: a device buffer, its views, and the context the model reads them by."""

    def __init__(self, bs: int, max_blocks: int, pool: AdapterPool, device: torch.device):
        self.layout = layout(bs, max_blocks)
        self.pin = device.type == "cuda"
        self.buffer = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.inputs = self.layout.views(self.buffer)
        self.load(StepBatch())  # no rows: every row padding
        t = self.inputs
        self.context = ForwardContext(positions=t["positions"], slot_mapping=t["slots"], block_tables=t["block_tables"],
                                      context_lens=t["context_lens"],
                                      lora=LoraBatch(pool, t["seg_starts"], t["seg_slots"]))

    def load(self, b: StepBatch, previous: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fill the static inputs with a decode step's rows, then padding rows (position 0, no slot, no context, no
        adapter segment), in one copy; then the input ids still pending on the device, from `previous` (the tokens
        of the step that sampled them). Returns the rows to take logits of (None: all, in order)."""
        n = len(b.input_ids)
        values = {"input_ids": b.input_ids, "positions": b.positions, "slots": b.slots, "context_lens": b.context_lens,
                  "block_tables": b.block_tables, "logits": b.logits_rows or (),
                  "pending_rows": b.pending_rows, "pending_from": b.pending_from,
                  "seg_starts": b.seg_starts or [0], "seg_slots": b.seg_slots or ()}  # no adapter: [0, n) is base
        fill = {"slots": -1, "seg_slots": -1, "seg_starts": n}  # segments past the last are empty: [n, n)
        self.buffer.copy_(self.layout.pack(values, fill, pin=self.pin), non_blocking=True)
        if b.pending_rows:
            k, t = len(b.pending_rows), self.inputs
            fill_pending(t["input_ids"], t["pending_rows"][:k], t["pending_from"][:k], previous)
        return None if b.logits_rows is None else self.inputs["logits"][:len(b.logits_rows)]


class DecodeGraphs:
    def __init__(self, model: CausalLM, pool: AdapterPool, max_batch: int, max_blocks: int, capture: bool = True):
        self.model, self.sizes, self.max_blocks = model, buckets(max_batch), max_blocks
        dev = next(model.parameters()).device
        self.buckets = {bs: Bucket(bs, max_blocks, pool, dev) for bs in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            bucket = self.buckets[bs]
            self.model(bucket.inputs["input_ids"], bucket.context)  # warm up (lazy inits, cuBLAS) outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self.outputs[bs] = self.model(bucket.inputs["input_ids"], bucket.context)
            memory_pool = memory_pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, batch: int, width: int) -> bool:
        return batch <= self.sizes[-1] and width <= self.max_blocks

    def run(self, b: StepBatch, previous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode step (no prefill rows): hidden states [B, hidden] of its rows, and the rows to take logits of
        (None: all, in order). `previous`: the tokens of the step whose samples are pending (Bucket.load)."""
        n = len(b.input_ids)
        bs = next(s for s in self.sizes if s >= n)
        bucket = self.buckets[bs]
        logits = bucket.load(b, previous)
        if bs in self.graphs:
            self.graphs[bs].replay()
            hidden = self.outputs[bs]
        else:  # not captured: the same inputs, run eagerly
            hidden = self.model(bucket.inputs["input_ids"], bucket.context)
        return hidden[:n], logits
