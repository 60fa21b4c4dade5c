"""Adapters of running sequences in the device pool: copied in on first use, pinned while a sequence uses them."""
from __future__ import annotations

from lorax_core.adapters import AdapterPool, AdapterWeights, PoolFullError
from lorax_core.engine.sequence import Sequence


class AdapterSlots:
    def __init__(self, pool: AdapterPool, adapters: dict[str, AdapterWeights]):
        self.pool, self.adapters = pool, adapters

    def acquire(self, seq: Sequence) -> bool:
        """Pin the sequence's adapter in the pool (loading it, evicting unpinned ones); False if it cannot fit now."""
        if seq.adapter is None:
            return True
        adapter = self.adapters[seq.adapter]
        try:
            self.pool.load(adapter.name, adapter.weights, adapter.scale)
        except PoolFullError:
            return False
        seq.adapter_slot = self.pool.pin(adapter.name)
        return True

    def release(self, seq: Sequence) -> None:
        if seq.adapter_slot >= 0:
            self.pool.unpin(seq.adapter)
            seq.adapter_slot = -1

    def wait(self, seqs: list[Sequence]) -> None:
        """Make the compute stream wait for the copies of these sequences' adapters (only those)."""
        for name in {s.adapter for s in seqs if s.adapter is not None}:
            self.pool.wait(name)
