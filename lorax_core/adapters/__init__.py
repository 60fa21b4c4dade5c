"""Adapters: PEFT adapter reading and validation, the paged device pool that the SGMV / BGMV kernels read, and
the registry that moves adapters between disk, host memory and the pool."""
from lorax_core.adapters.peft import AdapterSpec, AdapterWeights, inspect_peft_adapter, load_peft_adapter
from lorax_core.adapters.pool import AdapterPool, PoolConfig, PoolFullError, StagedAdapter, pages_for
from lorax_core.adapters.registry import AdapterInfo, AdapterRegistry, AdapterStats, Tier

__all__ = ["AdapterInfo", "AdapterPool", "AdapterRegistry", "AdapterSpec", "AdapterStats", "AdapterWeights",
           "PoolConfig", "PoolFullError", "StagedAdapter", "Tier", "inspect_peft_adapter", "load_peft_adapter",
           "pages_for"]
