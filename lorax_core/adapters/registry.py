"""The adapter registry: every registered adapter and the tier it lives in (disk -> host memory -> device pool).

Registration validates an adapter from its config and safetensors header only. Loading is asynchronous: a
loader thread reads the tensors and lays them out as pool pages in (pinned) host memory; the host tier keeps
those staged adapters in LRU order within a byte budget; `to_device` copies one into the device pool on the
pool's side stream. A load that fails at run time (the file changed or broke after registration) is reported
by `poll()`, so the engine fails only that adapter's requests.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import enum
from pathlib import Path

from lorax_core.adapters.peft import AdapterSpec, inspect_peft_adapter, load_peft_adapter
from lorax_core.adapters.pool import AdapterPool, StagedAdapter


class Tier(str, enum.Enum):
    DISK = "disk"
    LOADING = "loading"  # disk -> host memory in progress
    HOST = "host"
    DEVICE = "device"  # resident in the device pool (and usually also in host memory)


@dataclasses.dataclass
class AdapterStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_time_s: float = 0.0  # summed over requests: arrival to first scheduled
    host_loads: int = 0  # disk -> host memory
    device_loads: int = 0  # host memory -> device pool
    evictions: int = 0  # out of the device pool to make room for others
    failures: int = 0  # loads that failed after registration


@dataclasses.dataclass
class AdapterInfo:
    """One registered adapter, as `LLM.list_adapters()` reports it."""

    name: str
    source: str  # what load_adapter was given (a directory or a hub id)
    path: Path
    rank: int
    scale: float
    target_modules: tuple[str, ...]
    tier: Tier
    host_bytes: int  # staged size in host memory (0 while only on disk)
    stats: AdapterStats
    error: str | None = None  # the last run-time load failure, if any


@dataclasses.dataclass
class _Entry:
    source: str
    spec: AdapterSpec
    stats: AdapterStats = dataclasses.field(default_factory=AdapterStats)
    loading: futures.Future | None = None
    error: str | None = None


class AdapterRegistry:
    def __init__(self, pool: AdapterPool, modules: dict[str, tuple[int, int]], num_layers: int, max_rank: int,
                 host_budget_bytes: int, loader_threads: int = 2):
        self.pool, self.modules, self.num_layers, self.max_rank = pool, modules, num_layers, max_rank
        self.host_budget_bytes = host_budget_bytes
        self._entries: dict[str, _Entry] = {}
        self._host: collections.OrderedDict[str, StagedAdapter] = collections.OrderedDict()  # LRU first
        self._executor = futures.ThreadPoolExecutor(loader_threads, "lorax-adapter-loader") if loader_threads else None

    # --- registration ----------------------------------------------------------------------------------------
    def register(self, name: str, source: str, path: Path) -> AdapterInfo:
        """Validate the adapter at `path` (config + header) and register it; replaces an adapter of that name."""
        spec = inspect_peft_adapter(name, path, self.modules, self.num_layers, self.max_rank)
        need = self.pool.pages_for_ranks(spec.ranks)
        if need > self.pool.num_pages:
            raise ValueError(f"adapter {name!r} needs {need} pages of the adapter pool, which has {self.pool.num_pages}"
                             f"; raise adapter_pool_bytes above {need * self.pool.config.page_bytes}")
        if name in self._entries:
            self.unregister(name)
        self._entries[name] = _Entry(source, spec)
        return self.info(name)

    def unregister(self, name: str) -> None:
        """Forget an adapter: out of the device pool (it must not be pinned) and host memory."""
        self._entry(name)
        if name in self.pool.resident:
            self.pool.evict(name)
        self.pool.evictions.pop(name, None)
        self._host.pop(name, None)
        del self._entries[name]  # a load still running for it is dropped when it ends

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def stats(self, name: str) -> AdapterStats:
        return self._entry(name).stats

    def tier(self, name: str) -> Tier:
        entry = self._entry(name)
        if name in self.pool.resident:
            return Tier.DEVICE
        if name in self._host:
            return Tier.HOST
        return Tier.LOADING if entry.loading is not None else Tier.DISK

    def info(self, name: str) -> AdapterInfo:
        entry = self._entry(name)
        spec, staged = entry.spec, self._host.get(name)
        stats = dataclasses.replace(entry.stats, evictions=self.pool.evictions[name])  # the pool counts evictions
        return AdapterInfo(name, entry.source, spec.path, spec.rank, spec.scale, spec.target_modules, self.tier(name),
                           staged.nbytes if staged is not None else 0, stats, entry.error)

    @property
    def host_bytes(self) -> int:
        return sum(s.nbytes for s in self._host.values())

    # --- loading ---------------------------------------------------------------------------------------------
    def prefetch(self, name: str) -> None:
        """Start reading the adapter into host memory unless it is there, on its way, or on the device."""
        entry = self._entry(name)
        if entry.loading is not None or name in self._host or name in self.pool.resident:
            return
        if self._executor is None:
            entry.loading = futures.Future()
            try:
                entry.loading.set_result(self._stage(entry.spec))
            except Exception as err:
                entry.loading.set_exception(err)
        else:
            entry.loading = self._executor.submit(self._stage, entry.spec)

    def poll(self) -> list[tuple[str, str]]:
        """Take in finished host loads; returns (adapter, error message) for each load that failed."""
        failed = []
        for name, entry in self._entries.items():
            if entry.loading is None or not entry.loading.done():
                continue
            job, entry.loading = entry.loading, None
            try:
                staged = job.result()
            except Exception as err:
                message = str(err) if isinstance(err, ValueError) else f"adapter {name!r}: loading failed ({err!r})"
                entry.error = message
                entry.stats.failures += 1
                failed.append((name, message))
                continue
            entry.error = None
            entry.stats.host_loads += 1
            self._host[name] = staged
            self._trim_host(keep=name)
        return failed

    @property
    def loading(self) -> bool:
        return any(e.loading is not None for e in self._entries.values())

    def wait_for_loads(self, names, timeout: float = 1.0) -> bool:
        """Block until some host load finishes, or else until the device copies of `names` are done (the engine
        has nothing else to do). Returns whether there was anything to wait for."""
        jobs = [e.loading for e in self._entries.values() if e.loading is not None]
        if jobs:
            futures.wait(jobs, timeout, return_when=futures.FIRST_COMPLETED)
            return True
        copying = [name for name in names if not self.pool.ready(name)]
        for name in copying:
            self.pool.synchronize(name)
        return bool(copying)

    def staged(self, name: str) -> bool:
        """In host memory or on the device: `to_device` can place it now."""
        return name in self._host or name in self.pool.resident

    def to_device(self, name: str) -> int:
        """Copy a staged adapter into the device pool (async on a GPU) and return its slot; PoolFullError if
        every other resident adapter is pinned and its pages do not fit."""
        if name in self.pool.resident:
            return self.pool.slot(name)
        staged = self._host[name]
        self._host.move_to_end(name)
        slot = self.pool.load_staged(name, staged)
        self._entries[name].stats.device_loads += 1
        return slot

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- internals -------------------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown adapter {name!r}; register it first with load_adapter({name!r}, path) "
                             f"(registered: {sorted(self._entries) or 'none'})") from None

    def _stage(self, spec: AdapterSpec) -> StagedAdapter:
        """Loader thread: read the tensors (validated again) and lay them out as pool pages."""
        weights = load_peft_adapter(spec)
        return self.pool.stage(spec.name, weights.weights, weights.scale)

    def _trim_host(self, keep: str) -> None:
        """Drop least recently used staged adapters until the host tier is within budget (never `keep`)."""
        total = self.host_bytes
        for name in list(self._host):
            if total <= self.host_budget_bytes:
                break
            if name != keep:
                total -= self._host.pop(name).nbytes
