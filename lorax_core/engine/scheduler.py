"""Continuous batching across adapters, with LoRAX-style adapter exchange.

- Active adapters (at most max_active_adapters) are pinned in the device pool. A waiting adapter becomes
  active, the one whose oldest request has waited longest first, when a place is free and its pages fit.
  When adapters wait and no place is free, adapters active longer than the time slice stop taking new
  requests (drain) and leave once their running requests end; an idle adapter leaves at once (it stays
  cached in the pool until its pages are needed).
- Each step mixes decode and prefill: every running sequence whose prompt is cached decodes one token; the
  rest of the step's token budget (max_num_batched_tokens) goes to prompt chunks, first of prompts already
  being prefilled, then of waiting requests (chunked prefill: a long prompt takes several steps and never
  holds the decodes up).
- Admission: waiting requests in arrival order, each when its adapter is active and its copy done, and its
  KV blocks and max_num_seqs fit. A request whose adapter is still loading is passed over, so it holds up
  no one. When KV blocks run out at decode, the newest running sequence is preempted (its blocks freed,
  prefilled again later with its output so far: nothing is lost).
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
                 blocks: BlockManager, registry: AdapterRegistry, clock: Callable[[], float] = time.monotonic,
                 max_model_len: int | None = None):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
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

    def schedule(self) -> list[Sequence]:
        """The sequences of the next step, each with `chunk` set: 1 token for a decode, a piece of the prompt
        for a prefill. Decodes come first; prefill chunks (continued, then new requests) fill the token budget."""
        now = self.clock()
        for name, message in self.registry.poll():
            self._fail_waiting(name, message)
        self._exchange_adapters(now)
        batch = self._schedule_decodes()
        budget = self.max_num_batched_tokens - len(batch)
        budget -= self._continue_prefills(batch, budget)
        self._admit(batch, budget, now)
        return batch

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
    def _schedule_decodes(self) -> list[Sequence]:
        """One token for each running sequence whose prompt is in the cache; when KV blocks run out, the newest
        running sequence not yet in the batch is preempted (possibly this one)."""
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or len(seq) - seq.num_computed_tokens != 1 or self._ends_pending(seq):
                continue
            while not self.blocks.can_append(seq):
                victim = next(s for s in reversed(self.running) if s not in batch)
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                seq.chunk = 1
                batch.append(seq)
        return batch

    def _ends_pending(self, seq: Sequence) -> bool:
        """The sequence's token still on the device is its last, by max_tokens or the model's length (async
        scheduling): it has nothing more to decode."""
        if not seq.num_pending:
            return False
        return (seq.num_completion_tokens + seq.num_pending >= seq.params.max_tokens
                or (self.max_model_len is not None and len(seq) >= self.max_model_len))

    def _continue_prefills(self, batch: list[Sequence], budget: int) -> int:
        """The next chunks of prompts prefilled over several steps (their blocks were allocated at admission)."""
        used = 0
        for seq in self.running:
            remaining = len(seq) - seq.num_computed_tokens
            if remaining > 1 and used < budget:
                seq.chunk = min(remaining, budget - used)
                batch.append(seq)
                used += seq.chunk
        return used

    def _admit(self, batch: list[Sequence], budget: int, now: float) -> None:
        passed_over = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not self._admissible(seq):
                passed_over.append(seq)
                continue
            if not self.blocks.can_allocate(seq):
                self.waiting.appendleft(seq)
                break
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            seq.chunk = min(len(seq), budget)
            budget -= seq.chunk
            if seq.adapter is not None:
                seq.adapter_slot = self.registry.pool.slot(seq.adapter)
                self._running_with[seq.adapter] += 1
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                if seq.adapter is not None:
                    self.registry.stats(seq.adapter).queue_time_s += now - seq.arrival_time
            self.running.append(seq)
            batch.append(seq)
        self.waiting.extendleft(reversed(passed_over))

    # --- leaving the running set -----------------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is prefilled again (prompt + output so far) later."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
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
