"""The oracle: the engine's logits and greedy tokens equal transformers + PEFT, row by row, for batches that
mix adapters and base rows (fp32 on the CPU: tight tolerance)."""
import random

import pytest
import torch

from model_helpers import ADAPTERS, hf_greedy, hf_logits, hf_peft_model, save_adapters, save_model
from lorax_core import LLM, SamplingParams

FP32_TOL = dict(rtol=1e-4, atol=1e-4)
ROWS = ["r4_qv", None, "r8_all", "r16_rslora", "r8_all", "r8_pattern", None, "r4_qv"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = save_model(root / "base", request.param)
    adapters = save_adapters(base, root)
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_active_adapters=4,
              adapter_loader_threads=0)  # adapters load on first use, so the first step has them all
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm, hf_peft_model(base, adapters)


def random_prompts(n, rng, lo=3, hi=30):
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_logits_match_peft_row_by_row(setup):
    """Prefill and three decode steps of one mixed batch (sliding window 8 < prompt length for Mistral)."""
    llm, hf = setup
    prompts = random_prompts(len(ROWS), random.Random(0))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seqs = [llm.add_request(p, greedy, a) for p, a in zip(prompts, ROWS)]
    for step in range(4):
        batch = llm.scheduler.schedule()
        assert batch == seqs and all(s.chunk == (len(s) if step == 0 else 1) for s in batch)
        logits = llm.runner.run(batch)
        for seq, row in zip(seqs, logits):
            expected = hf_logits(hf, seq.token_ids, seq.adapter)[-1]
            torch.testing.assert_close(row, expected, **FP32_TOL, msg=lambda m: f"{seq.adapter}, step {step}: {m}")
        for seq, row in zip(seqs, logits):
            seq.num_computed_tokens, seq.chunk = len(seq), 0
            seq.append(int(row.argmax()))
    for seq in seqs:
        llm.abort(seq)
    assert llm.blocks.free_blocks == llm.blocks.num_blocks


def test_adapters_change_the_output(setup):
    llm, hf = setup
    ids = random_prompts(1, random.Random(1))[0]
    base = hf_logits(hf, ids, None)[-1]
    for name in ADAPTERS:
        assert (hf_logits(hf, ids, name)[-1] - base).abs().max() > 1e-2, name


def test_greedy_generation_matches_peft(setup):
    llm, hf = setup
    prompts = random_prompts(len(ROWS), random.Random(2))
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapters=ROWS)
    for prompt, adapter, out in zip(prompts, ROWS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, adapter, 6), adapter
        assert out.finish_reason == "length" and out.adapter == adapter
    assert llm.blocks.free_blocks == llm.blocks.num_blocks
    assert all(llm.pool._resident[n].pins == 0 for n in llm.pool.resident)


def test_chunked_prefill_mixed_with_decodes_matches_peft(setup):
    """A step budget of 6 tokens: prompts of 10..40 tokens are prefilled in chunks over several steps, in the same
    steps as other rows' decodes (for Mistral the cached prefix is longer than its window of 8)."""
    llm, hf = setup
    small = LLM(llm.model_dir, dtype="float32", device="cpu", kv_block_size=4, max_num_batched_tokens=6,
                max_num_seqs=4)
    for info in llm.list_adapters():
        small.load_adapter(info.name, info.path)
    steps, schedule = [], small.scheduler.schedule

    def recording():  # each step's chunk sizes
        batch = schedule()
        steps.append([s.chunk for s in batch])
        return batch

    small.scheduler.schedule = recording
    prompts = random_prompts(len(ROWS), random.Random(3), lo=10, hi=40)
    outs = small.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), adapters=ROWS)
    for prompt, adapter, out in zip(prompts, ROWS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, adapter, 5), adapter
    assert max(sum(chunks) for chunks in steps) <= 6
    assert any(1 in chunks and max(chunks) > 1 for chunks in steps)  # decodes and a prompt chunk in one step
    assert small.blocks.free_blocks == small.blocks.num_blocks


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
], ids=lambda r: r["rope_type"])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path, "llama", tokenizer=False, rope_scaling=rope, max_position_embeddings=512)
    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    llm = LLM(base, dtype="float32", device="cpu")
    prompt = random_prompts(1, random.Random(5), lo=100, hi=101)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0))[0]
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].float(), -1)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert int(expected[len(prompt) - 1 + i].argmax()) == token
        assert lp.logprob == pytest.approx(float(expected[len(prompt) - 1 + i, token]), abs=1e-4)
