"""KV cache block accounting: which fixed-size blocks of the paged cache each sequence owns."""
from __future__ import annotations

import collections

from lorax_core.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = collections.deque(range(num_blocks))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of the sequence (prefill)."""
        assert not seq.block_table, f"sequence {seq.id} already holds blocks"
        seq.block_table = [self._free.popleft() for _ in range(self.blocks_for(len(seq)))]

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's newest token (decode writes the key of token len(seq) - 1)."""
        return len(seq.block_table) >= self.blocks_for(len(seq)) or bool(self._free)

    def append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(len(seq)):
            seq.block_table.append(self._free.popleft())

    def deallocate(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
