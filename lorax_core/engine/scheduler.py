"""Continuous batching across adapters, with LoRAX-style adapter exchange.

- Active adapters (at most max_active_adapters) are pinned in the device pool. A waiting adapter becomes
  active, the one whose oldest request has waited longest first, when a place is free and its pages fit.
  When adapters wait and no place is free, adapters active longer than the time slice stop taking new
  requests (drain) and leave once their running requests end; an idle adapter leaves at once (it stays
  cached in the pool until its pages are needed).
- Prefill: waiting requests in arrival order, each admitted when its adapter is active and its copy done,
  and its KV blocks, the step's token budget and max_num_seqs fit. A request whose adapter is still loading
  is passed over, so it holds up no one.
- Decode: every running sequence one token; when KV blocks run out the newest is preempted (its blocks
  freed, prefilled again later with its output so far: nothing is lost).
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable

from lorax_core.adapters import AdapterRegistry, PoolFullError
from lorax_core.engine.block_manager import BlockManager
from lorax_core.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_active_adapters: int, time_slice_s: float,
                 blocks: BlockManager, registry: AdapterRegistry, clock: Callable[[], float] = time.monotonic):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_active_adapters, self.time_slice_s = max_active_adapters, time_slice_s
        self.blocks, self.registry, self.clock = blocks, registry, clock
        self.waiting: collections.deque[Sequence] = collections.deque()  # arrival order (preempted ones first)
        self.running: collections.deque[Sequence] = collections.deque()
        self.active: dict[str, float] = {}  # adapter -> when it became active
        self.draining: set[str] = set()
        self.demand: collections.Counter[str] = collections.Counter()  # unfinished requests per adapter
        self._running_with: collections.Counter[str] = collections.Counter()

    def add(self, seq: Sequence) -> None:
        seq.arrival_time = self.clock()
        if seq.adapter is not None:
            self.demand[seq.adapter] += 1
            self.registry.prefetch(seq.adapter)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        now = self.clock()
        for name, message in self.registry.poll():
            self._fail_waiting(name, message)
        self._exchange_adapters(now)
        batch = self._schedule_prefill(now)
        return (batch, True) if batch else (self._schedule_decode(), False)

    # --- adapters --------------------------------------------------------------------------------------------
    def _exchange_adapters(self, now: float) -> None:
        self._leave_drained()
        oldest: dict[str, float] = {}
        for seq in self.waiting:
            if seq.adapter is not None and seq.adapter not in self.active:
                oldest.setdefault(seq.adapter, seq.arrival_time)
        queued = sorted(oldest, key=oldest.__getitem__)  # longest-waiting adapter first
        for name in queued:
            self.registry.prefetch(name)
        blocked = self._activate([name for name in queued if self.registry.staged(name)], now)
        # Adapters wait for a place: drain as many expired ones (active longest first) as needed.
        expired = [n for n, since in self.active.items() if n not in self.draining and now - since >= self.time_slice_s]
        self.draining.update(expired[: max(0, len(blocked) - len(self.draining))])
        if self._leave_drained():
            self._activate(blocked, now)

    def _activate(self, ready: list[str], now: float) -> list[str]:
        """Activate adapters (in host memory or the pool) in order while places and pages allow; returns the rest."""
        ready = list(ready)
        while ready and len(self.active) < self.max_active_adapters:
            if not self.registry.staged(ready[0]):  # evicted from the pool just now to make room, not in host memory
                self.registry.prefetch(ready.pop(0))
                continue
            try:
                self.registry.to_device(ready[0])
            except PoolFullError:  # its pages fit only after some active adapter leaves
                break
            self.registry.pool.pin(ready[0])
            self.active[ready.pop(0)] = now
        return ready

    def _leave_drained(self) -> bool:
        done = [name for name in self.draining if not self._running_with[name]]
        for name in done:
            self._deactivate(name)
        return bool(done)

    def _deactivate(self, name: str) -> None:
        del self.active[name]
        self.draining.discard(name)
        self.registry.pool.unpin(name)

    def _admissible(self, seq: Sequence) -> bool:
        name = seq.adapter
        return name is None or (name in self.active and name not in self.draining and self.registry.pool.ready(name))

    def _fail_waiting(self, name: str, message: str) -> None:
        for seq in [s for s in self.waiting if s.adapter == name]:
            self.finish(seq, "error", message)

    # --- batches ---------------------------------------------------------------------------------------------
    def _schedule_prefill(self, now: float) -> list[Sequence]:
        batch, passed_over, tokens = [], [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not self._admissible(seq):
                passed_over.append(seq)
                continue
            if tokens + len(seq) > self.max_num_batched_tokens or not self.blocks.can_allocate(seq):
                self.waiting.appendleft(seq)
                break
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            if seq.adapter is not None:
                seq.adapter_slot = self.registry.pool.slot(seq.adapter)
                self._running_with[seq.adapter] += 1
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                if seq.adapter is not None:
                    self.registry.stats(seq.adapter).queue_time_s += now - seq.arrival_time
            self.running.append(seq)
            batch.append(seq)
            tokens += len(seq)
        self.waiting.extendleft(reversed(passed_over))
        return batch

    def _schedule_decode(self) -> list[Sequence]:
        batch = []
        while self.running:
            seq = self.running.popleft()
            while not self.blocks.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.blocks.append(seq)
                batch.append(seq)
        self.running.extend(batch)
        return batch

    # --- leaving the running set -----------------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is prefilled again (prompt + output so far) later."""
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.finish(reason, error, self.clock())
        name = seq.adapter
        if name is not None:
            self.demand[name] -= 1
            if not self.demand[name]:
                del self.demand[name]
                if name in self.active:  # idle: unpinned, still cached in the pool
                    self._deactivate(name)

    def _release(self, seq: Sequence) -> None:
        self.blocks.deallocate(seq)
        if seq.adapter_slot >= 0:
            self._running_with[seq.adapter] -= 1
            seq.adapter_slot = -1
