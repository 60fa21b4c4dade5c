"""Engine options, validated when they are made (`LLM(model, **engine_options)`)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 8192  # tokens per step (decodes + prompt chunks; at least max_num_seqs)
    max_model_len: int | None = None  # prompt + output; default: the model's context, capped by the KV cache
    kv_block_size: int = 16
    kv_cache_bytes: int | None = None  # default: gpu_memory_utilization of the GPU, or 512 MiB on the CPU
    gpu_memory_utilization: float = 0.85  # share of GPU memory for weights + adapters + KV cache
    adapter_pool_bytes: int | None = None  # default: 1 GiB on the GPU, 128 MiB on the CPU
    max_active_adapters: int = 32  # adapters resident in the device pool at once
    adapter_time_slice_s: float = 2.0  # an active adapter may be rotated out after this long if others wait
    host_adapter_cache_bytes: int | None = None  # host-memory tier; default 2 GiB (pinned) with a GPU, else 512 MiB
    adapter_loader_threads: int = 2  # threads reading adapters from disk (0: on the engine thread)
    max_lora_rank: int = 64
    adapter_page_size: int | None = None  # elements per pool page; default min(1024, hidden size)
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (GPU only)
    # launch each step before the host has the previous step's tokens (their device copies are the next inputs), so
    # the host's work (outputs, detokenizing, scheduling, inputs) overlaps the device's; default: on a GPU
    async_scheduling: bool | None = None
    seed: int = 0  # for requests without their own seed

    def __post_init__(self):
        positive = ["max_num_seqs", "max_num_batched_tokens", "kv_block_size", "max_active_adapters", "max_lora_rank"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "kv_cache_bytes", "adapter_pool_bytes", "adapter_page_size",
                     "host_adapter_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.adapter_page_size and self.adapter_page_size & (self.adapter_page_size - 1):
            raise ValueError(f"adapter_page_size must be a power of two, got {self.adapter_page_size}")
        if not isinstance(self.adapter_loader_threads, int) or self.adapter_loader_threads < 0:
            raise ValueError(f"adapter_loader_threads must be an integer >= 0, got {self.adapter_loader_threads!r}")
        if not self.adapter_time_slice_s >= 0:
            raise ValueError(f"adapter_time_slice_s must be >= 0 seconds, got {self.adapter_time_slice_s!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (on a GPU), got {self.async_scheduling!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
