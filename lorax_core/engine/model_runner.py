"""Turns the scheduler's list of sequences into batch tensors, once per step, and runs the model on them.

Prefill chunks come first, then decode rows (attention treats the two parts differently); within each part rows
are ordered by adapter so each adapter's rows form one segment: the LoRA ops read each adapter's weights once per
projection, and the grouping is computed here once per step instead of inside each of the 7 x layers LoRA calls.
The logits rows are taken in the caller's order, so no permutation follows. All of a step's integer inputs reach
the device in one copy (step_inputs.py). A step of decode rows only replays a CUDA graph when one fits.
"""
from __future__ import annotations

import torch

from lorax_core.adapters import AdapterPool
from lorax_core.engine.cuda_graphs import DecodeGraphs
from lorax_core.engine.sequence import Sequence
from lorax_core.engine.step_inputs import StepBatch, fill_pending, upload
from lorax_core.model.context import ForwardContext, LoraBatch
from lorax_core.model.llama import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, pool: AdapterPool, num_blocks: int, block_size: int,
                 graph_batch: int = 0, max_model_len: int = 0, max_num_seqs: int = 0):
        self.model, self.pool, self.block_size = model, pool, block_size
        c = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # decode attention's split counters and o's shrink's (one per row) for up to max_num_seqs decode rows a step,
        # one set for every layer and also the MLP's (the gate | up GEMV's CTAs count on the first): each call leaves
        # them zero
        counters = None
        if self.device.type == "cuda" and max_num_seqs:
            counters = torch.zeros(max_num_seqs * (c.num_kv_heads + 1), dtype=torch.int32, device=self.device)
        for i, layer in enumerate(model.layers):
            layer.attn.k_cache, layer.attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
            layer.attn.counters = layer.mlp.counters = counters
        self.graphs = None  # decode CUDA graphs for batches up to graph_batch (0: eager decode)
        if graph_batch and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, pool, graph_batch, -(-max_model_len // block_size))

    # --- batch tensors ---------------------------------------------------------------------------------------
    def batch(self, seqs: list[Sequence]) -> StepBatch:
        """One step's inputs on the host. Rows: prefill chunks first, then decode rows (a one-token chunk after a
        cached prefix, read by the paged decode op), each part ordered by adapter slot; the logits rows follow
        `seqs`' order."""
        order = sorted(range(len(seqs)), key=lambda i: (_is_decode_row(seqs[i]), seqs[i].adapter_slot))
        ordered = [seqs[i] for i in order]
        chunks = [s for s in ordered if not _is_decode_row(s)]
        decodes = ordered[len(chunks):]
        b = StepBatch()
        for seq in chunks:
            first, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.chunk
            b.input_ids += seq.token_ids[first:end]
            if end > len(seq.token_ids):  # a preempted sequence's newest token is still on the device
                b.pending(len(b.input_ids), seq.pending_row)
                b.input_ids.append(0)
            b.positions += range(first, end)
            b.slots += self._slots(seq, range(first, end))
            b.cu_seqlens.append(end - first + b.cu_seqlens[-1])
            b.chunk_starts.append(first)
            b.prefix_slots.append(self._slots(seq, range(end)) if first else None)
        for seq in decodes:
            if seq.num_pending:
                b.pending(len(b.input_ids), seq.pending_row)
            b.input_ids.append(seq.token_ids[-1] if not seq.num_pending else 0)
            b.positions.append(len(seq) - 1)
            b.slots += self._slots(seq, [len(seq) - 1])
        rows_cu = b.cu_seqlens + [b.cu_seqlens[-1] + i + 1 for i in range(len(decodes))]
        if decodes:
            width = max(len(s.block_table) for s in decodes)
            b.block_tables = [s.block_table + [0] * (width - len(s.block_table)) for s in decodes]
            b.context_lens = [len(s) for s in decodes]
        if any(s.adapter_slot >= 0 for s in ordered):  # segments of consecutive rows sharing an adapter slot
            b.seg_starts, b.seg_slots = [0], []
            for k, seq in enumerate(ordered):
                if b.seg_slots and b.seg_slots[-1] == seq.adapter_slot:
                    b.seg_starts[-1] = rows_cu[k + 1]
                else:
                    b.seg_slots.append(seq.adapter_slot)
                    b.seg_starts.append(rows_cu[k + 1])
        where = {i: k for k, i in enumerate(order)}  # input position -> row order
        rows = [rows_cu[where[i] + 1] - 1 for i, s in enumerate(seqs) if s.samples]
        b.logits_rows = None if rows == list(range(len(b.input_ids))) else rows
        return b

    def _slots(self, seq: Sequence, positions) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in positions]

    def upload(self, b: StepBatch) -> tuple[torch.Tensor, ForwardContext, torch.Tensor | None, torch.Tensor | None]:
        """The step's tensors on the model's device, sent in one copy: token ids, the forward context, and the rows
        whose token is pending with their rows in the previous step's tokens (None, None: no such row)."""
        long, int32 = torch.int64, torch.int32
        fields = {"input_ids": (long, b.input_ids), "positions": (long, b.positions), "slots": (long, b.slots)}
        if b.logits_rows is not None:
            fields["logits"] = (long, b.logits_rows)
        if b.block_tables:
            fields |= {"block_tables": (int32, b.block_tables), "context_lens": (int32, b.context_lens)}
        if b.seg_slots is not None:
            fields |= {"seg_starts": (int32, b.seg_starts), "seg_slots": (int32, b.seg_slots)}
        if b.pending_rows:
            fields |= {"pending_rows": (long, b.pending_rows), "pending_from": (long, b.pending_from)}
        fields |= {f"prefix{i}": (long, p) for i, p in enumerate(b.prefix_slots) if p is not None}
        t = upload(fields, self.device)
        lora = LoraBatch(self.pool, t["seg_starts"], t["seg_slots"]) if b.seg_slots is not None else None
        ctx = ForwardContext(positions=t["positions"], slot_mapping=t["slots"], num_prefill_tokens=b.num_prefill_tokens,
                             cu_seqlens=b.cu_seqlens, chunk_starts=b.chunk_starts, lora=lora,
                             prefix_slots=[t.get(f"prefix{i}") for i in range(len(b.prefix_slots))],
                             block_tables=t.get("block_tables"), context_lens=t.get("context_lens"),
                             logits_indices=t.get("logits"))
        return t["input_ids"], ctx, t.get("pending_rows"), t.get("pending_from")

    # --- run -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], previous: torch.Tensor | None = None) -> torch.Tensor:
        """Logits fp32 [S, vocab] of the next token of each sequence whose chunk reaches its end (`seq.samples`),
        in the order of `seqs`. `previous`: the tokens (on the device) of the step whose samples some of these
        sequences still have pending (`seq.pending_row` indexes it)."""
        b = self.batch(seqs)
        if b.pending_rows and previous is None:
            raise RuntimeError("a sequence's newest token is pending on the device, but no step's tokens were given")
        graphs = self.graphs
        if b.num_prefill_tokens == 0 and graphs is not None and graphs.fits(len(seqs), len(b.block_tables[0])):
            hidden, logits_indices = graphs.run(b, previous)
        else:
            input_ids, ctx, rows, sources = self.upload(b)
            if rows is not None:
                fill_pending(input_ids, rows, sources, previous)
            hidden, logits_indices = self.model(input_ids, ctx), ctx.logits_indices
        return self.model.compute_logits(hidden if logits_indices is None else hidden[logits_indices])


def _is_decode_row(seq: Sequence) -> bool:
    return seq.chunk == 1 and seq.num_computed_tokens == len(seq) - 1 > 0

