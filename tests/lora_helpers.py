"""Random adapters and token layouts for the LoRA op tests (shared by the CPU and CUDA tests)."""
import random

import torch

from conftest import nf4_gemv_weight

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


def linear_sgmv_case(modules, names, ranks, tokens, lengths, seg_adapters, dtype=torch.float32, device="cpu",
                     page_size=64, bias=True, seed=0):
    """Inputs of nf4_linear_sgmv and their fp32 result before silu_mul.

    A pool of len(ranks) adapters over `modules` ({name: (in, out)}; adapter i has ranks[i] per module, the last one
    only the first of `names`), an NF4 weight whose outputs are those of `names` side by side, segments of `lengths`
    rows with adapters `seg_adapters` (-1: none). The exact result uses the pool's stored (rounded) LoRA weights:
    x @ W.T + bias + each row's scale * (x @ A.T) @ B.T, in fp32.
    """
    from lorax_core.ops import reference as ref
    from lorax_core.quant import NF4Weight

    gen = torch.Generator().manual_seed(seed)
    pages = sum(max(r) * (-(-n_in // page_size) - (-n_out // page_size))
                for r in ranks for n_in, n_out in modules.values())
    pool = make_pool(modules, num_layers=2, budget_pages=2 * pages, page_size=page_size, max_slots=8, dtype=dtype,
                     device=device)
    dense = {}
    for i, r in enumerate(ranks):
        only = names[:1] if i == len(ranks) - 1 and i > 0 else None
        weights = random_adapter(modules, r, num_layers=2, only=only, gen=gen)
        slot = pool.load(f"a{i}", weights, scale=0.5 + i / 4)
        pool.wait(f"a{i}")
        dense[slot] = (weights, 0.5 + i / 4)
    k = modules[names[0]][0]
    outs = [modules[n][1] for n in names]
    n_out = sum(outs)
    w = NF4Weight.quantize(torch.randn(n_out, k, generator=gen), 64, True)
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seg = torch.tensor(seg_adapters, dtype=torch.int32)
    layer = 1
    # each adapter's modules as one: A stacked over their ranks, B block-diagonal over their output columns
    stacked, scales = {}, {}
    for a, (weights, scale) in dense.items():
        a_rows, b_cols, col = [], [], 0
        for name, out in zip(names, outs):
            if (layer, name) in weights:
                a_w, b_w = (t.to(dtype).float() for t in weights[(layer, name)])
                a_rows.append(a_w)
                b_cols.append(torch.zeros(n_out, b_w.shape[1]).index_copy_(0, torch.arange(col, col + out), b_w))
            col += out
        if a_rows:
            stacked[a], scales[a] = (torch.cat(a_rows), torch.cat(b_cols, dim=1)), scale
    row_slots = [a if a in stacked else -1 for s, a in enumerate(seg_adapters) for _ in range(lengths[s])]
    exact = ref.nf4_linear_sgmv(x, nf4_gemv_weight(w, dtype), b, row_slots, stacked, scales, silu_mul=False)
    to = {"device": device}
    args = {"x": x.to(**to), "w": w.to(device), "bias": b.to(**to) if bias else None, "pool": pool, "layer": layer,
            "modules": names, "seg_starts": starts.to(**to), "seg_slots": seg.to(**to)}
    return args, exact.to(device)
