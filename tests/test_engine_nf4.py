"""NF4 bases: the engine quantizing at load time vs transformers + bitsandbytes (nf4, double quant) + PEFT, and
loading a checkpoint transformers saved in 4-bit.

Tolerance: both sides use the same NF4 bytes (bitsandbytes-exact quantization), so the remaining difference is
fp32 summation order in the dequantized matmuls: logits agree to NF4_TOL; greedy tokens match on nearly all
sequences (a near-tie in a random tiny model may flip one, so we allow 1 in 8).
"""
import random

import pytest
import torch

from model_helpers import bnb_config, hf_greedy, hf_logits, hf_peft_model, save_adapters, save_model
from lorax_core import LLM, SamplingParams
from lorax_core.quant import NF4Linear

NF4_TOL = dict(rtol=1e-3, atol=1e-3)
ROWS = ["r8_all", None, "r16_rslora", "r4_qv", "r8_all", None, "r8_pattern", "r16_rslora"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4")
    base = save_model(root / "base", "llama", hidden_size=128, intermediate_size=256)
    adapters = save_adapters(base, root)
    hf = hf_peft_model(base, adapters, quantization_config=bnb_config(), dtype=torch.float32, device_map="cpu")
    llm = LLM(base, dtype="float32", device="cpu", quantize="nf4", kv_block_size=4, adapter_loader_threads=0)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm, hf, root, adapters


def test_projections_are_nf4(setup):
    llm, *_ = setup
    attn = llm.model.layers[0].attn
    assert isinstance(attn.qkv.base, NF4Linear) and isinstance(llm.model.layers[1].mlp.down.base, NF4Linear)


def test_fused_projections_keep_double_quantization_where_their_parts_fill_nested_blocks(setup):
    """gate | up (parts of 256 rows of 128: 512 absmax blocks each) keeps each part's 8-bit absmax and its offset;
    q | k | v cannot (k's 64 rows are 128 blocks, half a nested block of 256): its absmax is fp32. The logits tests
    below run both against bitsandbytes."""
    llm, *_ = setup
    layer = llm.model.layers[0]
    gate_up, qkv = layer.mlp.gate_up.base.weight, layer.attn.qkv.base.weight
    assert gate_up.double_quant and gate_up.part_starts == (512,) and gate_up.part_offsets[0] != gate_up.offset
    assert not qkv.double_quant and qkv.absmax.dtype == torch.float32


def test_nf4_logits_match_bitsandbytes_peft(setup):
    llm, hf, *_ = setup
    prompts = [[random.Random(i).randrange(3, 300) for _ in range(5 + 3 * i)] for i in range(len(ROWS))]
    seqs = [llm.add_request(p, SamplingParams(max_tokens=2, temperature=0), a) for p, a in zip(prompts, ROWS)]
    batch = llm.scheduler.schedule()
    assert batch == seqs
    for seq, row in zip(batch, llm.runner.run(batch)):
        torch.testing.assert_close(row, hf_logits(hf, seq.token_ids, seq.adapter)[-1], **NF4_TOL)
    for seq in seqs:
        llm.abort(seq)


def test_nf4_greedy_matches_on_nearly_all(setup):
    llm, hf, *_ = setup
    prompts = [[random.Random(100 + i).randrange(3, 300) for _ in range(6)] for i in range(len(ROWS))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), adapters=ROWS)
    same = sum(o.token_ids == hf_greedy(hf, p, a, 5) for o, p, a in zip(outs, prompts, ROWS))
    assert same >= len(ROWS) - 1


def test_loads_a_bitsandbytes_4bit_checkpoint(setup, tmp_path):
    """transformers' save_pretrained of a 4-bit model: the engine reads its NF4 bytes and computes the same
    logits as quantizing the original weights at load time (the bytes are identical)."""
    llm, hf, root, adapters = setup
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=bnb_config(), dtype=torch.float32,
                                         device_map="cpu").save_pretrained(tmp_path)
    saved = LLM(tmp_path, dtype="float32", device="cpu", kv_block_size=4)
    saved.load_adapter("r8_all", adapters["r8_all"])
    prompt = list(range(5, 30))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    a, b = (m.generate([prompt], params, adapters=["r8_all"])[0] for m in (saved, llm))
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(torch.tensor([t.logprob for t in a.logprobs]),
                               torch.tensor([t.logprob for t in b.logprobs]), rtol=1e-5, atol=1e-5)


def decode_step_ops(llm, adapters) -> dict:
    """The lorax_core ops that one decode step of len(adapters) sequences (one per adapter) dispatches, counted."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name.startswith("lorax_core."):
                self.count[name.removeprefix("lorax_core.")] += 1
            return func(*args, **(kwargs or {}))

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    seqs = [llm.add_request([5, 6, 7 + i], params, a) for i, a in enumerate(adapters)]
    while not all(s.completion_ids for s in seqs):
        llm.step()
    batch = llm.scheduler.schedule()
    assert sorted(s.id for s in batch) == sorted(s.id for s in seqs) and all(s.chunk == 1 for s in batch)
    ops = Ops()
    with ops:
        llm.runner.run(batch)
    for seq in seqs:
        llm.abort(seq)
    return dict(ops.count)


def test_batch1_decode_step_runs_the_fused_ops(setup):
    """What a batch-1 NF4 decode step with an adapter dispatches (on CUDA each op one kernel, o's LoRA shrink
    aside: attention does it given counters, test_attention_does_os_shrink_given_counters): per layer the norm with
    the q | k | v shrink, q | k | v with rotary and the KV cache write, attention, o, the norm with the gate | up
    shrink, gate | up with SwiGLU and down's shrink, and down. A change that splits a fusion apart shows here."""
    llm, *_ = setup
    layers = llm.model.config.num_layers
    assert decode_step_ops(llm, ["r8_all"]) == {
        "rms_norm": 1, "add_rms_norm_sgmv_shrink": 2 * layers - 1, "nf4_linear_sgmv_rotary": layers,
        "paged_attention_decode": layers, "nf4_linear_sgmv": 2 * layers, "nf4_linear_sgmv_silu_shrink": layers,
        "add_rms_norm": 1}


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_attention_does_os_shrink_given_counters(setup, rows):
    """With counters for it (the runner gives them on a GPU), decode attention also does o's LoRA shrink
    (paged_attention_decode_sgmv_shrink) in steps whose o takes the fused NF4 ops (up to 4 rows): the same logits as
    without, and with SHRINK_O_IN_ATTENTION off, the same ops as without counters."""
    from lorax_core.model import attention as model_attention

    llm, *_ = setup
    layers, kv_heads = llm.model.config.num_layers, llm.model.config.num_kv_heads
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7 + i] for i in range(rows)]
    expected = llm.generate(prompts, params, adapters=ROWS[:rows])
    counters = torch.zeros(8 * (kv_heads + 1), dtype=torch.int32)
    try:
        for layer in llm.model.layers:
            layer.attn.counters = counters
        ops = decode_step_ops(llm, ROWS[:rows])
        assert ops.get("paged_attention_decode_sgmv_shrink", 0) == (layers if rows <= 4 else 0)
        assert ops.get("paged_attention_decode", 0) == (0 if rows <= 4 else layers)
        got = llm.generate(prompts, params, adapters=ROWS[:rows])
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [[t.logprob for t in o.logprobs] for o in got] == [[t.logprob for t in o.logprobs] for o in expected]
        assert not counters.any()  # (the CPU leaves them alone)
        model_attention.SHRINK_O_IN_ATTENTION = False
        assert "paged_attention_decode_sgmv_shrink" not in decode_step_ops(llm, ROWS[:rows])
    finally:
        model_attention.SHRINK_O_IN_ATTENTION = True
        for layer in llm.model.layers:
            layer.attn.counters = None


@pytest.mark.parametrize("rows", [4, 5])
def test_fused_projections_up_to_four_rows(setup, rows):
    """Decode steps of up to FUSED_NF4_MAX_ROWS (4) rows take the fused projections; more rows take nf4_linear and
    the LoRA ops one after the other (on an H100 the fused GEMV's 8-row instance lost to them)."""
    from lorax_core.model import layers as model_layers

    llm, *_ = setup
    assert model_layers.FUSED_NF4_MAX_ROWS == 4
    layers = llm.model.config.num_layers
    ops = decode_step_ops(llm, ROWS[:rows])
    fused = rows <= 4
    assert ops.get("nf4_linear_sgmv_rotary", 0) == (layers if fused else 0)
    assert ops.get("nf4_linear_sgmv", 0) == (2 * layers if fused else 0)
    assert ops.get("nf4_linear_sgmv_silu_shrink", 0) == (layers if fused else 0)
    assert ops.get("nf4_linear", 0) == (0 if fused else 4 * layers)
