"""Random adapters and token layouts for the LoRA op tests (shared by the CPU and CUDA tests)."""
import random

import torch

from lorax_core.adapters import AdapterPool, PoolConfig

POPULARITY = ["identical", "uniform", "skewed", "distinct"]


def make_pool(modules, num_layers=2, budget_pages=4096, page_size=64, max_slots=16, max_rank=128,
              dtype=torch.float32, device="cpu"):
    config = PoolConfig(num_layers=num_layers, modules=modules, dtype=dtype, device=device, page_size=page_size,
                        max_slots=max_slots, max_rank=max_rank,
                        budget_bytes=budget_pages * page_size * torch.empty(0, dtype=dtype).element_size())
    return AdapterPool(config)


def random_adapter(modules, ranks, num_layers=2, only=None, gen=None):
    """weights[(layer, module)] = (A [r, in], B [out, r]) with nonzero B, one rank per module."""
    weights = {}
    for layer in range(num_layers):
        for i, (module, (n_in, n_out)) in enumerate(modules.items()):
            if only is not None and module not in only:
                continue
            r = ranks[i % len(ranks)]
            weights[(layer, module)] = (torch.randn(r, n_in, generator=gen) / n_in**0.5,
                                        torch.randn(n_out, r, generator=gen) / r**0.5)
    return weights


def token_slots(num_tokens, slots, popularity, base_every=0, rng=None):
    """Per-token adapter slots (-1 = base row) following an adapter popularity pattern."""
    rng = rng or random.Random(0)
    if popularity == "identical":
        out = [slots[0]] * num_tokens
    elif popularity == "uniform":
        out = [rng.choice(slots) for _ in range(num_tokens)]
    elif popularity == "skewed":  # zipf-like: weight 1 / rank
        out = rng.choices(slots, weights=[1 / (i + 1) for i in range(len(slots))], k=num_tokens)
    else:  # distinct (as far as there are adapters)
        out = [slots[i % len(slots)] for i in range(num_tokens)]
    if base_every:
        out = [-1 if i % base_every == 0 else s for i, s in enumerate(out)]
    return out
