"""The engine on a GPU: CUDA-graph decode == eager decode == the CPU engine (skipped without a GPU)."""
import random

import pytest
import torch

from model_helpers import MIXED_ROWS, save_adapters, save_model
from lorax_core import LLM, SamplingParams

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    base = save_model(root / "base", "mistral", hidden_size=128, intermediate_size=256)
    return base, save_adapters(base, root)


def engine(paths, **kwargs):
    base, adapters = paths
    llm = LLM(base, kv_block_size=16, kv_cache_bytes=2**26, adapter_loader_threads=0, **kwargs)  # same batches
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm


def run(llm, params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))] for _ in MIXED_ROWS]
    return llm.generate(prompts, params, adapters=MIXED_ROWS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager(paths, dtype):
    graphs = run(engine(paths, device="cuda", dtype=dtype, cuda_graphs=True))
    eager = run(engine(paths, device="cuda", dtype=dtype, cuda_graphs=False))
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
    for a, b in zip(graphs, eager):
        torch.testing.assert_close([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_async_scheduling_equals_synchronous(paths, cuda_graphs):
    """On a GPU steps overlap the host by default: the tokens and logprobs of a synchronous engine."""
    lagged = engine(paths, device="cuda", dtype="bfloat16", cuda_graphs=cuda_graphs)
    assert lagged.async_scheduling
    sync = run(engine(paths, device="cuda", dtype="bfloat16", cuda_graphs=cuda_graphs, async_scheduling=False))
    outs = run(lagged)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync]
    for a, b in zip(outs, sync):  # a dropped row may change a batch's shape, and so its kernels' sum order
        torch.testing.assert_close([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], rtol=0, atol=0.05)


def test_cuda_engine_matches_cpu_engine(paths):
    gpu = run(engine(paths, device="cuda", dtype="float32"))
    cpu = run(engine(paths, device="cpu", dtype="float32"))
    same = sum(a.token_ids == b.token_ids for a, b in zip(gpu, cpu))
    assert same >= len(MIXED_ROWS) - 1  # TF32-free fp32 on both; a near-tie may flip one sequence


def test_nf4_bf16_tracks_cpu_fp32(paths):
    """bf16 activations over NF4 weights vs the fp32 CPU engine on the same NF4 codes, first token only (later
    tokens diverge after any near-tie; on this tiny random model bf16 alone flips 4 of 9 greedy sequences on a
    CPU too). The GPU's pick must be among the CPU's top 5 with nearly the same log-probability."""
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    gpu = run(engine(paths, device="cuda", dtype="bfloat16", quantize="nf4"), params)
    cpu = run(engine(paths, device="cpu", dtype="float32", quantize="nf4"), params)
    drift = []
    for g, c in zip(gpu, cpu):
        token = g.token_ids[0]
        assert token in c.logprobs[0].top, (g.adapter, token, c.logprobs[0].top)
        drift.append(abs(g.logprobs[0].logprob - c.logprobs[0].top[token]))
    assert max(drift) < 0.5 and sum(drift) / len(drift) < 0.2, drift  # bf16 on the CPU drifts 0.02-0.39, mean 0.12
    assert sum(g.token_ids == c.token_ids for g, c in zip(gpu, cpu)) >= len(MIXED_ROWS) // 2


def test_nf4_batch1_fused_kernels_track_the_separate_ops(paths):
    """One sequence at a time (batch-1 decode, in CUDA graphs): the NF4 projections' fused kernels (the norm with the
    LoRA shrink, the GEMV with the LoRA expand and SwiGLU in its epilogue) against nf4_linear, sgmv, silu_mul and
    add_rms_norm one after the other (layers.FUSED_NF4 = False), on the same NF4 codes in bf16. The fused GEMV
    rounds once where the separate ops round two or three times, so the logits differ by bf16 roundings: each
    greedy pick must be among the other's top 5 with nearly the same log-probability."""
    from lorax_core.model import layers

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=5)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))] for _ in range(3)]
    adapters = ["r8_all", None, "r16_rslora"]
    outputs = {}
    for fused in (True, False):
        layers.FUSED_NF4 = fused  # read as the graphs are captured
        try:
            llm = engine(paths, device="cuda", dtype="bfloat16", quantize="nf4", max_num_seqs=1)
            outputs[fused] = [llm.generate([p], params, adapters=[a])[0] for p, a in zip(prompts, adapters)]
        finally:
            layers.FUSED_NF4 = True
    for f, s in zip(outputs[True], outputs[False]):
        token = f.token_ids[0]
        assert token in s.logprobs[0].top, (f.adapter, token, s.logprobs[0].top)
        assert abs(f.logprobs[0].logprob - s.logprobs[0].top[token]) < 0.3
