"""Adapters: PEFT adapter reading and validation, and the paged device pool that the SGMV / BGMV kernels read."""
from lorax_core.adapters.peft import AdapterWeights, read_peft_adapter
from lorax_core.adapters.pool import AdapterPool, PoolConfig, PoolFullError

__all__ = ["AdapterPool", "AdapterWeights", "PoolConfig", "PoolFullError", "read_peft_adapter"]
