"""Adapters: the paged device pool that the SGMV / BGMV kernels read (registry and tiered cache come next)."""
from lorax_core.adapters.pool import AdapterPool, PoolConfig, PoolFullError

__all__ = ["AdapterPool", "PoolConfig", "PoolFullError"]
