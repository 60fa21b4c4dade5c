"""Decode attention over the paged KV cache (paged_attention_decode) on Mistral-7B's shapes (32 query heads, 8 KV
heads, head_dim 128, bf16, 16-token blocks), against torch's scaled_dot_product_attention over a contiguous cache
(what transformers runs each decode step), in the same run:
- lorax: the split kernel whose last CTA merges the splits (counters given, as the engine runs it);
- two_kernels: the splits merged by a second kernel (no counters);
- pdl_off: lorax with programmatic dependent launch off;
- sdpa: F.scaled_dot_product_attention(enable_gqa=True) of one query token over [B, 8, context, 128] K and V.
The block table is as wide as 8192 tokens for every case, as the engine sizes it for its longest context: the split
count depends on the width and the batch only (CUDA graphs), so short contexts show the cost of the idle splits.
GB/s counts the K and V bytes of the contexts read."""
import pytest
import torch

from conftest import copies_for, gpu_time_us, record, rotating

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
TABLE_TOKENS = 8192
CASES = [(b, n) for b in (1, 8, 32) for n in (128, 512, 2048, 8192)]
MAX_BYTES = 4 << 30  # of KV cache copies per case


def kv_bytes(batch, context):
    return batch * context * KV_HEADS * HEAD_DIM * 2 * 2


@pytest.mark.parametrize("impl", ["lorax", "two_kernels", "pdl_off", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-ctx{c[1]}")
def test_decode_attention(benchmark, impl, case):
    import torch.nn.functional as F

    from lorax_core._library import set_programmatic_launch
    from lorax_core.ops import paged_attention_decode

    batch, context = case
    nbytes = kv_bytes(batch, context)
    copies = max(1, min(copies_for(nbytes), MAX_BYTES // nbytes))
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    if impl == "sdpa":
        caches = [(torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
                   torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16))
                  for _ in range(copies)]
        nxt, calls = rotating(caches)
        q4 = q[:, :, None, :]

        def fn():
            k, v = nxt()
            return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
    else:
        per_seq = context // BLOCK
        blocks = batch * per_seq
        gen = torch.Generator(device="cuda").manual_seed(0)
        caches = []
        for _ in range(copies):  # each copy: its own cache and a shuffled block table
            k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            tables = torch.zeros(batch, TABLE_TOKENS // BLOCK, dtype=torch.int32, device="cuda")
            tables[:, :per_seq] = torch.randperm(blocks, device="cuda", generator=gen).int().view(batch, per_seq)
            caches.append((k, v, tables))
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        counters = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device="cuda") if impl != "two_kernels" else None
        nxt, calls = rotating(caches)

        def fn():
            k, v, tables = nxt()
            return paged_attention_decode(q, k, v, tables, lens, scale, counters=counters)

    was = set_programmatic_launch(impl != "pdl_off")  # read at each launch, kept by the CUDA graph
    try:
        us, mode = gpu_time_us(benchmark, fn, calls=max(calls, 8))
    finally:
        set_programmatic_launch(was)
    record(kind="attention", shape=f"b{batch}-ctx{context}", impl=impl, us=us, gbps=nbytes / us / 1e3, mode=mode)
