"""The paged adapter pool: one preallocated arena per device, cut into fixed-size pages, shared by every adapter.

Each rank row of an adapter's A ([r, in]) and of its B^T ([r, out]) is stored in ceil(len / page_size) pages,
any free ones; `page_table[slot, layer, module, 0|1, row, chunk]` says which. Adapters of ranks 1..max_rank
share the arena, each using only the pages its rank needs; loading or evicting one never moves another.
Bookkeeping (free pages, slots, pins, LRU order) is plain Python. `stage` lays an adapter out as pages in
(pinned) host memory, off the engine thread if wanted; `load_staged` copies it into the arena on a side CUDA
stream with one event per adapter (synchronous on the CPU).

Page table cost: slots x layers x modules x 2 x max_rank x ceil(max_dim / page_size) int32 entries.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import torch


def pages_for(modules: dict[str, tuple[int, int]], ranks: dict[tuple[int, str], int], page_size: int) -> int:
    """Pages an adapter with ranks[(layer, module)] takes: each rank row of A and of B^T in whole pages."""
    return sum(r * (math.ceil(modules[m][0] / page_size) + math.ceil(modules[m][1] / page_size))
               for (_, m), r in ranks.items())


class PoolFullError(RuntimeError):
    """No room for an adapter: every resident adapter is pinned by running requests."""


@dataclasses.dataclass
class PoolConfig:
    num_layers: int
    modules: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    budget_bytes: int
    dtype: torch.dtype = torch.bfloat16
    device: str | torch.device = "cpu"
    page_size: int = 1024  # elements per page, a power of two
    max_slots: int = 32  # adapters resident at once
    max_rank: int = 64

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_layers <= 0 or not self.modules or self.max_slots <= 0 or not 1 <= self.max_rank <= 1024:
            raise ValueError("a pool needs layers > 0, modules, max_slots > 0 and 1 <= max_rank <= 1024")
        self.device = torch.device(self.device)

    @property
    def page_bytes(self) -> int:
        return self.page_size * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def num_pages(self) -> int:
        return self.budget_bytes // self.page_bytes

    @property
    def chunks(self) -> int:
        return math.ceil(max(max(dims) for dims in self.modules.values()) / self.page_size)


@dataclasses.dataclass
class StagedAdapter:
    """An adapter laid out as pool pages in host memory, ready for one copy into the arena."""

    rows: torch.Tensor  # [pages, page_size], the rows of every A and B^T cut into pages
    table: torch.Tensor  # int32 [layers, modules, 2, max_rank, chunks]: page numbers relative to rows
    ranks: torch.Tensor  # int32 [layers, modules]
    scale: float

    @property
    def num_pages(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.table, self.ranks))

    def pinned(self) -> StagedAdapter:
        return StagedAdapter(self.rows.pin_memory(), self.table.pin_memory(), self.ranks.pin_memory(), self.scale)


@dataclasses.dataclass
class _Resident:
    slot: int
    pages: list[int]
    pins: int = 0
    event: torch.cuda.Event | None = None  # recorded after its copy (pinned staged memory dropped by the host
    # cache meanwhile is not reused early: torch's host allocator records the copy stream)


class AdapterPool:
    """Loads adapters into free pages, pins the ones in use, and evicts the least recently used others."""

    def __init__(self, config: PoolConfig):
        self.config = c = config
        if c.num_pages <= 0:
            raise ValueError(f"pool budget {c.budget_bytes} bytes is smaller than one page ({c.page_bytes} bytes)")
        self.module_names = list(c.modules)
        self.page_size = c.page_size
        self.arena = torch.zeros(c.num_pages, c.page_size, dtype=c.dtype, device=c.device)
        shape = (c.max_slots, c.num_layers, len(self.module_names))
        self.page_table = torch.zeros(*shape, 2, c.max_rank, c.chunks, dtype=torch.int32, device=c.device)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=c.device)
        self.scales = torch.zeros(c.max_slots, dtype=torch.float32, device=c.device)
        self._free_pages = collections.deque(range(c.num_pages))
        self._free_slots = collections.deque(range(c.max_slots))
        self._resident: collections.OrderedDict[str, _Resident] = collections.OrderedDict()  # LRU first
        self._copy_stream = torch.cuda.Stream(c.device) if c.device.type == "cuda" else None
        self.evictions: collections.Counter[str] = collections.Counter()  # LRU evictions to make room, per adapter

    # --- queries ---------------------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.arena.shape[0]

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def module_index(self, module: str) -> int:
        try:
            return self.module_names.index(module)
        except ValueError:
            raise ValueError(f"module {module!r} is not in this pool (it has {self.module_names})") from None

    def slot(self, name: str) -> int:
        return self._entry(name).slot

    def pages_needed(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> int:
        return self.pages_for_ranks({key: a.shape[0] for key, (a, _) in weights.items()})

    def pages_for_ranks(self, ranks: dict[tuple[int, str], int]) -> int:
        return pages_for(self.config.modules, ranks, self.page_size)

    # --- load / evict ----------------------------------------------------------------------------------------
    def stage(self, name: str, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
              scale: float) -> StagedAdapter:
        """Lay an adapter out as pool pages in host memory (pinned when the pool is on a GPU).

        Host-side work only, safe to run on a loader thread: `load_staged` then needs just one async copy.
        weights[(layer, module)] = (A [r, in], B [out, r]), PEFT's lora_A / lora_B weights; scale = alpha / r
        (or alpha / sqrt(r) with rsLoRA).
        """
        self._check_weights(name, weights)
        c, p = self.config, self.page_size
        m_count = len(self.module_names)
        table = torch.zeros(c.num_layers, m_count, 2, c.max_rank, c.chunks, dtype=torch.int32)  # page numbers
        ranks = torch.zeros(c.num_layers, m_count, dtype=torch.int32)  # relative to the adapter's first page
        rows, next_page = [], 0
        for (layer, module), (a, b) in weights.items():
            m, r = self.module_index(module), a.shape[0]
            ranks[layer, m] = r
            for ab, mat in ((0, a), (1, b.T)):  # rows of A and of B^T
                chunks = math.ceil(mat.shape[1] / p)
                padded = torch.zeros(r, chunks * p, dtype=c.dtype)
                padded[:, : mat.shape[1]] = mat.detach().to("cpu", c.dtype)
                rows.append(padded.reshape(r * chunks, p))
                table[layer, m, ab, :r, :chunks] = torch.arange(next_page, next_page + r * chunks).reshape(r, chunks)
                next_page += r * chunks
        staged = StagedAdapter(torch.cat(rows), table, ranks, float(scale))
        return staged.pinned() if c.device.type == "cuda" else staged

    def load(self, name: str, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scale: float) -> int:
        """Copy an adapter into the pool and return its slot (`stage` + `load_staged`)."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name].slot
        return self.load_staged(name, self.stage(name, weights, scale))

    def load_staged(self, name: str, staged: StagedAdapter) -> int:
        """Copy a staged adapter into free pages and return its slot; evicts unpinned adapters (LRU) to make room.

        On a GPU the copy runs on the pool's side stream: `ready(name)` says when it is done and `wait(name)`
        makes the compute stream wait for it (and only it).
        """
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name].slot
        need = staged.num_pages
        if need > self.num_pages:
            raise PoolFullError(f"adapter {name!r} needs {need} pages, the whole pool has {self.num_pages}; "
                                f"raise the pool budget above {need * self.config.page_bytes} bytes")
        self._make_room(name, need)
        entry = _Resident(slot=self._free_slots.popleft(), pages=[self._free_pages.popleft() for _ in range(need)])
        try:
            self._write(entry, staged)
        except BaseException:  # nothing half-loaded stays behind
            self._free_pages.extend(entry.pages)
            self._free_slots.append(entry.slot)
            raise
        self._resident[name] = entry
        return entry.slot

    def evict(self, name: str) -> None:
        entry = self._entry(name)
        if entry.pins:
            raise RuntimeError(f"adapter {name!r} is in use by {entry.pins} running request(s); it cannot be evicted")
        self.wait(name)
        self.ranks[entry.slot].zero_()  # its rows read as rank 0 from now on
        del self._resident[name]
        self._free_pages.extend(entry.pages)
        self._free_slots.append(entry.slot)

    def pin(self, name: str) -> int:
        """Mark an adapter in use (never evicted while pinned); returns its slot and marks it recently used."""
        entry = self._entry(name)
        entry.pins += 1
        self._resident.move_to_end(name)
        return entry.slot

    def unpin(self, name: str) -> None:
        entry = self._entry(name)
        if entry.pins == 0:
            raise RuntimeError(f"adapter {name!r} is not pinned")
        entry.pins -= 1

    def ready(self, name: str) -> bool:
        """Whether this adapter's copy into the pool has finished (always True on the CPU)."""
        entry = self._entry(name)
        return entry.event is None or entry.event.query()

    def synchronize(self, name: str) -> None:
        """Block the host until this adapter's copy is done."""
        entry = self._entry(name)
        if entry.event is not None:
            entry.event.synchronize()

    def wait(self, name: str) -> None:
        """Make the current stream wait for this adapter's copy (and only this one's)."""
        entry = self._entry(name)
        if entry.event is not None:
            torch.cuda.current_stream(self.config.device).wait_event(entry.event)

    def dense(self, name: str, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read an adapter's (A [r, in], B [out, r]) back out of the pages (for tests and debugging)."""
        entry, m = self._entry(name), self.module_index(module)
        self.wait(name)
        n_in, n_out = self.config.modules[module]
        rank = int(self.ranks[entry.slot, layer, m])
        table = self.page_table[entry.slot, layer, m]
        rows = [self.arena[table[ab, :rank, :chunks].long()].reshape(rank, chunks * self.page_size)[:, :n]
                for ab, n, chunks in ((0, n_in, math.ceil(n_in / self.page_size)),
                                      (1, n_out, math.ceil(n_out / self.page_size)))]
        return rows[0], rows[1].T

    # --- internals -------------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Resident:
        try:
            return self._resident[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not in the pool (resident: {self.resident})") from None

    def _check_weights(self, name, weights):
        c = self.config
        if not weights:
            raise ValueError(f"adapter {name!r} has no LoRA weights")
        for (layer, module), (a, b) in weights.items():
            n_in, n_out = c.modules.get(module, (None, None))
            if n_in is None or not 0 <= layer < c.num_layers:
                raise ValueError(f"adapter {name!r}: ({layer}, {module!r}) is not a layer/module of this model")
            r = a.shape[0]
            if a.shape != (r, n_in) or b.shape != (n_out, r):
                raise ValueError(f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                                 f"{tuple(b.shape)}, expected A [r, {n_in}] and B [{n_out}, r]")
            if not 1 <= r <= c.max_rank:
                raise ValueError(f"adapter {name!r}: rank {r} is outside 1..{c.max_rank} (the pool's max_rank)")

    def _make_room(self, name: str, need: int) -> None:
        while len(self._free_pages) < need or not self._free_slots:
            victim = next((n for n, e in self._resident.items() if e.pins == 0), None)
            if victim is None:
                raise PoolFullError(
                    f"adapter pool full: {name!r} needs {need} pages and a slot, {self.free_pages} pages and "
                    f"{len(self._free_slots)} slots are free, and all {len(self._resident)} resident adapters are "
                    "pinned by running requests; retry when they finish, or raise the pool budget / max_slots")
            self.evict(victim)
            self.evictions[victim] += 1

    def _write(self, entry: _Resident, staged: StagedAdapter) -> None:
        dev = self.config.device
        page_ids = torch.tensor(entry.pages, dtype=torch.int32)
        table = page_ids[staged.table.long()]  # relative page numbers -> this adapter's pages
        page_ids = page_ids.long()
        if self._copy_stream is None:
            self._store(entry.slot, page_ids, staged.rows, table, staged.ranks, staged.scale)
            return
        page_ids, table = page_ids.pin_memory(), table.pin_memory()
        # Reused pages may still be read by kernels queued before their adapter was evicted.
        self._copy_stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._copy_stream):
            self._store(entry.slot, page_ids, staged.rows, table, staged.ranks, staged.scale)
            entry.event = torch.cuda.Event()
            entry.event.record()

    def _store(self, slot, page_ids, rows, table, ranks, scale):
        dev = self.config.device
        self.arena.index_copy_(0, page_ids.to(dev, non_blocking=True), rows.to(dev, non_blocking=True))
        self.page_table[slot].copy_(table, non_blocking=True)
        self.ranks[slot].copy_(ranks, non_blocking=True)
        self.scales[slot] = scale
