"""First-come-first-served continuous batching: waiting prompts are prefilled when their KV blocks and adapter
fit; otherwise running sequences decode, the newest preempted (recomputed later) when KV blocks run out."""
from __future__ import annotations

import collections

from lorax_core.engine.adapter_slots import AdapterSlots
from lorax_core.engine.block_manager import BlockManager
from lorax_core.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager, adapters: AdapterSlots):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.blocks, self.adapters = blocks, adapters
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: collections.deque[Sequence] = collections.deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        batch = self._schedule_prefill()
        return (batch, True) if batch else (self._schedule_decode(), False)

    def _schedule_prefill(self) -> list[Sequence]:
        batch, tokens = [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if tokens + len(seq) > self.max_num_batched_tokens or not self.blocks.can_allocate(seq):
                break
            if not self.adapters.acquire(seq):  # every pool slot pinned by running sequences: wait for them
                break
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(self.waiting.popleft())
            batch.append(seq)
            tokens += len(seq)
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

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and adapter pin; it is prefilled again (prompt + output) later."""
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.finish(reason, error)

    def _release(self, seq: Sequence) -> None:
        self.blocks.deallocate(seq)
        self.adapters.release(seq)
