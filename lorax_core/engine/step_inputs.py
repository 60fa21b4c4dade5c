"""A step's integer inputs (token ids, positions, KV slots, block tables, adapter segments, ...) packed into one
byte buffer, so they reach the GPU in one host-to-device copy instead of one small copy each.

Each small `torch.tensor(list).to("cuda")` is a copy from pageable memory: the host stages it, and it costs the
step several microseconds of host time before any kernel runs; a decode step had eight of them, and a graph replay
then ran about fifteen copy kernels into its static inputs. Here the step writes every field in place in one
pinned host buffer and sends it with one asynchronous copy (PyTorch's pinned-memory allocator keeps the buffer
from being reused until that copy has run). The device tensors are views of the copied buffer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass
class StepBatch:
    """One step's inputs as host lists, rows in the runner's order (prefill chunks, then decode rows)."""

    input_ids: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)  # KV cache slot of each row
    cu_seqlens: list[int] = dataclasses.field(default_factory=lambda: [0])  # prefill chunk c: rows [cu[c], cu[c+1])
    chunk_starts: list[int] = dataclasses.field(default_factory=list)
    prefix_slots: list[list[int] | None] = dataclasses.field(default_factory=list)  # see ForwardContext
    block_tables: list[list[int]] = dataclasses.field(default_factory=list)  # decode rows, zero-padded to one width
    context_lens: list[int] = dataclasses.field(default_factory=list)
    seg_starts: list[int] | None = None  # adapter segments (None: no row uses an adapter)
    seg_slots: list[int] | None = None
    logits_rows: list[int] | None = None  # the rows to take logits of, in the caller's order; None: all, in order
    # rows whose input token the previous step sampled, still on the device, and their rows in its tokens
    pending_rows: list[int] = dataclasses.field(default_factory=list)
    pending_from: list[int] = dataclasses.field(default_factory=list)

    def pending(self, row: int, source: int) -> None:
        self.pending_rows.append(row)
        self.pending_from.append(source)

    @property
    def num_prefill_tokens(self) -> int:
        return self.cu_seqlens[-1]


_NUMPY = {torch.int32: np.int32, torch.int64: np.int64}


class Layout:
    """Named integer fields of fixed shapes in one byte buffer: the int64 fields first, then the int32 ones, so each
    starts where a view of its type may start."""

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]):
        for name, dtype, _ in fields:
            if dtype not in _NUMPY:
                raise TypeError(f"field {name!r}: only int32 and int64 fields, not {dtype}")
        self.fields: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, first, numel
        self.groups: list[tuple[torch.dtype, int, list[str], list[int]]] = []  # dtype, first byte, names, numels
        offset = 0
        for dtype in (torch.int64, torch.int32):
            group = [(name, tuple(shape)) for name, t, shape in fields if t == dtype]
            if not group:
                continue
            names, numels = [name for name, _ in group], [math.prod(shape) for _, shape in group]
            self.groups.append((dtype, offset, names, numels))
            first = offset // dtype.itemsize
            for (name, shape), numel in zip(group, numels):
                self.fields[name] = (dtype, shape, first, numel)
                first += numel
            offset += sum(numels) * dtype.itemsize
        self.nbytes = -(-offset // 8) * 8  # whole-buffer int64 views need a multiple of 8 bytes

    def pack(self, values: dict, fill: dict | None = None, pin: bool = False) -> torch.Tensor:
        """A new host buffer (uint8 [nbytes], pinned if `pin`) holding `values` (name -> list, or list of rows for
        a 2-D field). Rows or elements past the end of a value hold `fill[name]` (default 0)."""
        fill = fill or {}
        host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        data = host.numpy()
        typed = {dtype: data.view(_NUMPY[dtype]) for dtype, *_ in self.groups}
        for name, (dtype, shape, first, numel) in self.fields.items():
            field = typed[dtype][first:first + numel].reshape(shape)
            value = values.get(name, ())
            if len(value) < shape[0] or (len(shape) == 2 and any(len(row) != shape[1] for row in value)):
                field[...] = fill.get(name, 0)
            if not len(value):
                continue
            if len(shape) == 1:
                field[:len(value)] = value
            elif all(len(row) == len(value[0]) for row in value):
                field[:len(value), :len(value[0])] = value  # rows of one width: one numpy assignment
            else:
                for i, row in enumerate(value):
                    field[i, :len(row)] = row
        return host

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field as a tensor viewing `buffer` (uint8 [nbytes], on any device)."""
        out = {}
        for dtype, offset, names, numels in self.groups:
            typed = buffer.view(dtype)  # the whole buffer: nbytes is a multiple of 8
            skip = offset // dtype.itemsize
            parts = typed.split_with_sizes([skip, *numels, typed.numel() - skip - sum(numels)])
            for name, part in zip(names, parts[1:]):
                shape = self.fields[name][1]
                out[name] = part.view(shape) if len(shape) > 1 else part
        return out


def upload(fields: dict[str, tuple[torch.dtype, list]], device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors on `device` holding these lists (name -> (dtype, list, or list of equal-length rows)), sent together
    in one copy."""
    layout = _layout(tuple((name, dtype, _shape(value)) for name, (dtype, value) in fields.items()))
    host = layout.pack({name: value for name, (_, value) in fields.items()}, pin=device.type == "cuda")
    return layout.views(host.to(device, non_blocking=True))


def fill_pending(input_ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor, previous: torch.Tensor) -> None:
    """input_ids[rows[i]] = previous[sources[i]], on the device: inputs that the step before sampled."""
    input_ids.index_copy_(0, rows, previous.index_select(0, sources))


def _shape(value: list) -> tuple[int, ...]:
    if value and isinstance(value[0], (list, tuple)):
        return (len(value), len(value[0]))
    return (len(value),)


@functools.lru_cache(maxsize=64)
def _layout(fields: tuple) -> Layout:  # decode steps repeat a few shapes: their layouts are made once
    return Layout(fields)
