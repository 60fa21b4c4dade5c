"""Turns the scheduler's list of sequences into batch tensors, once per step, and runs the model on them.

Prefill chunks come first, then decode rows (attention treats the two parts differently); within each part rows
are ordered by adapter so each adapter's rows form one segment: the LoRA ops read each adapter's weights once per
projection, and the grouping is computed here once per step instead of inside each of the 7 x layers LoRA calls.
A step of decode rows only replays a CUDA graph when one fits.
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
    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ForwardContext]:
        """Batch tensors of one step, rows in the order of `seqs`: prefill chunks first, then decode rows (a
        one-token chunk after a cached prefix, read by the paged decode op)."""
        chunks = [s for s in seqs if not _is_decode_row(s)]
        decodes = seqs[len(chunks):]
        assert all(_is_decode_row(s) for s in decodes), "prefill chunks must come before decode rows"
        ids, positions, slots, cu, starts, prefix = [], [], [], [0], [], []
        for seq in chunks:
            first, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.chunk
            ids += seq.token_ids[first:end]
            positions += range(first, end)
            slots += self._slots(seq, range(first, end))
            cu.append(end - first + cu[-1])
            starts.append(first)
            prefix.append(self._long(self._slots(seq, range(end))) if first else None)
        for seq in decodes:
            ids.append(seq.last_token)
            positions.append(len(seq) - 1)
            slots += self._slots(seq, [len(seq) - 1])
        rows_cu = cu + [cu[-1] + i + 1 for i in range(len(decodes))]
        ctx = ForwardContext(positions=self._long(positions), slot_mapping=self._long(slots), num_prefill_tokens=cu[-1],
                             cu_seqlens=cu, chunk_starts=starts, prefix_slots=prefix, lora=self._lora(seqs, rows_cu),
                             logits_indices=self._long([rows_cu[i + 1] - 1 for i, s in enumerate(seqs) if s.samples]))
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            ctx.block_tables = self._int([s.block_table + [0] * (width - len(s.block_table)) for s in decodes])
            ctx.context_lens = self._int([len(s) for s in decodes])
        return self._long(ids), ctx

    def _slots(self, seq: Sequence, positions) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in positions]

    def _lora(self, seqs: list[Sequence], cu: list[int]) -> LoraBatch | None:
        """Segments of consecutive rows sharing an adapter slot (rows arrive grouped by slot)."""
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
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits fp32 [S, vocab] of the next token of each sequence whose chunk reaches its end (`seq.samples`),
        in the order of `seqs`."""
        order = sorted(range(len(seqs)), key=lambda i: (_is_decode_row(seqs[i]), seqs[i].adapter_slot))
        ordered = [seqs[i] for i in order]
        input_ids, ctx = self.prepare(ordered)
        graphs = self.graphs
        if ctx.num_prefill_tokens == 0 and graphs is not None and graphs.fits(len(seqs), ctx.block_tables.shape[1]):
            hidden = graphs.run(input_ids, ctx)
        else:
            hidden = self.model(input_ids, ctx)
        logits = self.model.compute_logits(hidden[ctx.logits_indices])
        sampled = [i for i in order if seqs[i].samples]  # input position of each logits row
        back = sorted(range(len(sampled)), key=sampled.__getitem__)  # logits rows in input order
        return logits[torch.tensor(back, dtype=torch.long, device=logits.device)]


def _is_decode_row(seq: Sequence) -> bool:
    return seq.chunk == 1 and seq.num_computed_tokens == len(seq) - 1 > 0

