"""Turns the scheduler's list of sequences into batch tensors, once per step, and runs the model on them.

Rows are ordered by adapter so each adapter's rows form one segment: the LoRA ops read each adapter's weights
once per projection, and the grouping is computed here once per step instead of inside each of the
7 x layers LoRA calls.
"""
from __future__ import annotations

import torch

from lorax_core.adapters import AdapterPool
from lorax_core.model.context import ForwardContext, LoraBatch
from lorax_core.engine.cuda_graphs import DecodeGraphs
from lorax_core.engine.sequence import Sequence
from lorax_core.model.llama import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: AdapterPool, num_blocks: int, block_size: int,
                 graph_batch: int = 0, max_model_len: int = 0):
        self.model, self.pool, self.block_size = model, pool, block_size
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(model.layers):
            layer.attn.k_cache, layer.attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        self.graphs = None  # decode CUDA graphs for batches up to graph_batch (0: eager decode)
        if graph_batch and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, pool, graph_batch, -(-max_model_len // block_size))

    # --- batch tensors ---------------------------------------------------------------------------------------
    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ForwardContext]:
        ids, positions, slots, cu = [], [], [], [0]
        for seq in seqs:
            n = len(seq)
            ids += seq.token_ids
            positions += range(n)
            slots += [seq.block_table[i // self.block_size] * self.block_size + i % self.block_size for i in range(n)]
            cu.append(cu[-1] + n)
        ctx = ForwardContext(is_prefill=True, positions=self._long(positions), slot_mapping=self._long(slots),
                             cu_seqlens=cu, lora=self._lora(seqs, cu), logits_indices=self._long([e - 1 for e in cu[1:]]))
        return self._long(ids), ctx

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ForwardContext]:
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        positions = [len(s) - 1 for s in seqs]
        slots = [s.block_table[p // self.block_size] * self.block_size + p % self.block_size
                 for s, p in zip(seqs, positions)]
        ctx = ForwardContext(is_prefill=False, positions=self._long(positions), slot_mapping=self._long(slots),
                             block_tables=self._int(tables), context_lens=self._int([len(s) for s in seqs]),
                             lora=self._lora(seqs, list(range(len(seqs) + 1))))
        return self._long([s.last_token for s in seqs]), ctx

    def _lora(self, seqs: list[Sequence], cu: list[int]) -> LoraBatch | None:
        """Segments of consecutive rows sharing an adapter slot (rows arrive sorted by slot)."""
        if all(s.adapter_slot < 0 for s in seqs):
            return None
        starts, slots = [0], []
        for i, seq in enumerate(seqs):
            if slots and slots[-1] == seq.adapter_slot:
                starts[-1] = cu[i + 1]
            else:
                slots.append(seq.adapter_slot)
                starts.append(cu[i + 1])
        return LoraBatch(self.pool, self._int(starts), self._int(slots))

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _int(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(self.device, non_blocking=True)

    # --- run -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits fp32 [len(seqs), vocab] of each sequence's next token, in the order of `seqs`."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].adapter_slot)
        ordered = [seqs[i] for i in order]
        input_ids, ctx = (self.prepare_prefill if is_prefill else self.prepare_decode)(ordered)
        if not is_prefill and self.graphs is not None and self.graphs.fits(len(seqs), ctx.block_tables.shape[1]):
            hidden = self.graphs.run(input_ids, ctx)
        else:
            hidden = self.model(input_ids, ctx)
        if ctx.logits_indices is not None:
            hidden = hidden[ctx.logits_indices]
        logits = self.model.compute_logits(hidden)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]
