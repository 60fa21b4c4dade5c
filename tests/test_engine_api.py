"""The LLM API: text and token prompts, sampling parameters, streaming, continuous batching, preemption, and
bad input refused with a ValueError that says what is wrong while every other request completes."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_helpers import save_adapter, save_adapters, save_model
from lorax_core import LLM, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base = save_model(root / "base", "llama")
    return base, save_adapters(base, root)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(paths, request):
    """The engine with and without async scheduling (each step launched before the host has the last one's
    tokens): every test here holds for both."""
    base, adapters = paths
    engine = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_num_seqs=16,
                 async_scheduling=request.param)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def test_text_prompts_and_outputs(llm):
    outs = llm.generate(["the red cat is", "one two three"], GREEDY, adapters=["r8_all", None])
    for out in outs:
        assert out.prompt_token_ids[0] == 1  # <s> from the tokenizer
        assert len(out.token_ids) == 8 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_token_prompts_equal_text_prompts(llm):
    ids = llm.tokenizer("the dog was big")["input_ids"]
    a, b = llm.generate(["the dog was big", ids], GREEDY)
    assert a.token_ids == b.token_ids


def test_batching_does_not_change_results(llm):
    """A request alone and inside a mixed batch gives the same greedy tokens."""
    ps, rows = prompts(6), ["r4_qv", None, "r16_rslora", "r8_all", None, "r8_pattern"]
    together = llm.generate(ps, GREEDY, adapters=rows)
    for p, a, out in zip(ps, rows, together):
        assert llm.generate([p], GREEDY, adapters=[a])[0].token_ids == out.token_ids


def test_continuous_batching_requests_join_between_steps(llm):
    expected = [o.token_ids for o in llm.generate(prompts(4, 1), GREEDY, adapters=["r8_all", None, "r4_qv", None])]
    seqs = []
    for p, a in zip(prompts(4, 1), ["r8_all", None, "r4_qv", None]):
        seqs.append(llm.add_request(p, GREEDY, a))
        llm.step()
        llm.step()
    while not all(s.finished for s in seqs):
        llm.step()
    assert [s.completion_ids for s in seqs] == expected


def test_preemption_when_the_kv_cache_runs_out(paths):
    """16 blocks of 4 tokens for 6 sequences of up to 19 + 12 tokens: sequences are preempted and recomputed,
    and every output equals the unconstrained engine's."""
    base, adapters = paths
    small = LLM(base, dtype="float32", device="cpu", kv_block_size=4, kv_cache_bytes=16 * 4 * 2 * 2 * 32 * 4)
    big = LLM(base, dtype="float32", device="cpu", kv_block_size=4)
    for engine in (small, big):
        engine.load_adapter("r8_all", adapters["r8_all"])
    ps, rows = prompts(6, 2), ["r8_all", None] * 3
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in small.generate(ps, params, rows)] == [o.token_ids for o in big.generate(ps, params, rows)]
    assert small.blocks.free_blocks == small.blocks.num_blocks


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = llm.generate(prompts(3, 3), params, adapters=["r8_all", None, "r4_qv"])
    b = llm.generate(prompts(3, 3), params, adapters=["r8_all", None, "r4_qv"])
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = llm.generate(prompts(3, 3), SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True))
    assert [o.token_ids for o in c] != [o.token_ids for o in a]


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = [o.token_ids for o in llm.generate(prompts(3), GREEDY)]
    for params in (SamplingParams(max_tokens=8, temperature=0.8, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.8, top_p=1e-6, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.8, min_p=1.0, ignore_eos=True)):
        assert [o.token_ids for o in llm.generate(prompts(3), params)] == greedy


def test_repetition_penalty_changes_greedy_output(llm):
    base = llm.generate(prompts(4, 4), GREEDY)
    penalized = llm.generate(prompts(4, 4), SamplingParams(max_tokens=8, temperature=0, repetition_penalty=5.0,
                                                           ignore_eos=True))
    assert [o.token_ids for o in base] != [o.token_ids for o in penalized]


def test_stop_tokens_stop_strings_and_eos(llm):
    out = llm.generate(prompts(1), GREEDY)[0]
    stop_at = out.token_ids[3]
    stopped = llm.generate(prompts(1), SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at],
                                                      ignore_eos=True))[0]
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(stop_at) + 1] and stopped.finish_reason == "stop"
    text_out = llm.generate(["the sun"], GREEDY)[0]
    stop = text_out.text[3:6]
    if stop:
        cut = llm.generate(["the sun"], SamplingParams(max_tokens=8, temperature=0, stop=[stop], ignore_eos=True))[0]
        assert cut.text == text_out.text[: text_out.text.find(stop)] and cut.finish_reason == "stop"
    eos = llm.generate(prompts(1), SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[]))[0]
    assert eos.finish_reason in ("stop", "length")
    if eos.finish_reason == "stop":
        assert eos.token_ids[-1] in llm.eos_token_ids


def test_logprobs(llm):
    out = llm.generate(prompts(1), SamplingParams(max_tokens=4, temperature=0, logprobs=5, ignore_eos=True))[0]
    assert [t.token_id for t in out.logprobs] == out.token_ids
    for t in out.logprobs:
        assert len(t.top) == 5 and t.logprob == pytest.approx(max(t.top.values()))  # greedy takes the top token
    assert llm.generate(prompts(1), GREEDY)[0].logprobs is None


def test_stream_deltas_add_up_to_generate(llm):
    full = llm.generate(["the big dog"], GREEDY, adapters=["r8_all"])[0]
    deltas = list(llm.stream("the big dog", GREEDY, adapter="r8_all"))
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert "".join(d.text for d in deltas) == full.text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_stream_stopped_early_cancels_the_request(llm):
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.scheduler.has_work() and llm.blocks.free_blocks == llm.blocks.num_blocks


# --- refusals ----------------------------------------------------------------------------------------------
def test_bad_requests_refused_others_complete(llm):
    good = prompts(2)
    vocab = llm.model.config.vocab_size
    biased = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias={3: 1.0, vocab: 5.0})
    with pytest.raises(RequestError) as err:
        llm.generate([good[0], [], [5] * 595, good[1], [5, 6], [5, 6]], [GREEDY] * 5 + [biased],
                     adapters=["r8_all", None, None, None, "nope", None])
    message = str(err.value)
    assert "request 1: the prompt is empty" in message
    assert "request 2: the prompt has 595 tokens" in message and "max_model_len" in message
    assert "request 4: unknown adapter 'nope'" in message and "load_adapter" in message
    assert f"request 5: logit_bias names token ids [{vocab}] outside the vocabulary (0..{vocab - 1})" in message
    outs = err.value.outputs
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length", "error", "error"]
    assert outs[0].token_ids == llm.generate([good[0]], GREEDY, adapters=["r8_all"])[0].token_ids
    assert llm.blocks.free_blocks == llm.blocks.num_blocks


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1), "temperature must be >= 0"), (dict(top_p=0), "top_p must be in"),
    (dict(top_k=-2), "top_k must be"), (dict(max_tokens=0), "max_tokens must be"),
    (dict(min_p=2), "min_p must be"), (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(logprobs=100), "logprobs must be"), (dict(stop=[""]), "stop must be non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be"), (dict(presence_penalty=3), "presence_penalty must be"),
    (dict(frequency_penalty=-3), "frequency_penalty must be"), (dict(logit_bias={1: 200}), "logit_bias must map"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_token_ids_and_prompt_types(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([5, 10_000])
    with pytest.raises(ValueError, match="a prompt is a string or a list of token ids"):
        llm.add_request(3.5)
    with pytest.raises(ValueError, match="a prompt is a string or a list of token ids"):
        llm.add_request([True, False])


def test_numpy_and_tensor_prompts(llm):
    """A 1-D array or tensor is one prompt, a 2-D one a prompt per row, numpy ints are token ids."""
    import numpy as np

    ids = [5, 6, 7, 8]
    expected = llm.generate([ids], GREEDY)[0].token_ids
    assert llm.generate(np.array(ids), GREEDY)[0].token_ids == expected
    assert [o.token_ids for o in llm.generate(torch.tensor([ids, ids]), GREEDY)] == [expected, expected]
    assert llm.generate([[np.int64(t) for t in ids]], GREEDY)[0].token_ids == expected
    assert [d for d in llm.stream(np.array(ids), GREEDY)][-1].finish_reason == "length"


def _broken_adapter(src, dst, config_edit=None, weights_edit=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(src / "adapter_model.safetensors")
    if weights_edit:
        tensors = weights_edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _json(path, value):
    (path / "adapter_config.json").write_text(json.dumps(value))
    return path


def _truncate(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case,message", [
    ("dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("bias", "trains biases"),
    ("lm_head", "not a LoRA A/B weight"), ("other_base", "trained for another base model"),
    ("not_lora", "only LORA adapters"), ("missing", "adapter_config.json not found"),
    ("corrupt", "cannot be read"), ("rank", "max_lora_rank"), ("alpha_0", "lora_alpha=0"), ("r_0", "r=0"),
    ("r_none", "r=None"), ("r_text", "r='abc'"), ("list", "holds a list"), ("bad_pattern", "not a valid pattern"),
    ("r_mismatch", "weights of rank 8, adapter_config.json says 16"), ("twice", "has two lora_A weights"),
])
def test_broken_adapters_refused_with_the_fix(llm, paths, tmp_path, case, message):
    src = paths[1]["r8_all"]
    make = {
        "dora": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(use_dora=True)),
        "modules_to_save": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(modules_to_save=["lm_head"])),
        "bias": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(bias="all")),
        "lm_head": lambda: _broken_adapter(src, tmp_path / case, weights_edit=lambda t: {
            **t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}),
        "other_base": lambda: _broken_adapter(src, tmp_path / case, weights_edit=lambda t: {
            k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v for k, v in t.items()}),
        "not_lora": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(peft_type="IA3")),
        "missing": lambda: tmp_path,
        "corrupt": lambda: _truncate(_broken_adapter(src, tmp_path / case)),
        "rank": lambda: save_adapter(paths[0], tmp_path / case, r=128, lora_alpha=8, target_modules=["q_proj"]),
        "alpha_0": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(lora_alpha=0)),
        "r_0": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(r=0)),
        "r_none": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(r=None)),
        "r_text": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(r="abc")),
        "list": lambda: _json(_broken_adapter(src, tmp_path / case), []),
        "bad_pattern": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(alpha_pattern={"q_proj(": 4})),
        "r_mismatch": lambda: _broken_adapter(src, tmp_path / case, lambda c: c.update(r=16)),  # PEFT refuses it
        "twice": lambda: _broken_adapter(src, tmp_path / case, weights_edit=lambda t: t | {  # two names, one A
            k.replace("lora_A.weight", "lora_A.default.weight"): v.clone() for k, v in t.items() if "lora_A" in k}),
    }
    with pytest.raises(ValueError, match=message) as err:
        llm.load_adapter(case, make[case]())
    assert repr(case) in str(err.value)
    assert llm.generate([[5, 6, 7]], GREEDY, adapters=["r8_all"])[0].finish_reason == "length"  # still serving


def test_model_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not be fetched from the Hugging Face hub"):
        LLM("no-such-org/no-such-model", device="cpu")
    with pytest.raises(ValueError, match="no such directory"):
        LLM(str(tmp_path / "missing" / "dir"), device="cpu")
    with pytest.raises(ValueError, match="no config.json"):
        LLM(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        LLM(tmp_path, device="cpu", max_num_seqs=0)


def test_sharded_checkpoint_and_tokenizerless_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "one", "llama", tokenizer=False)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    one, sharded = (LLM(p, dtype="float32", device="cpu") for p in (base, tmp_path / "sharded"))
    assert one.generate([[4, 5, 6]], GREEDY)[0].token_ids == sharded.generate([[4, 5, 6]], GREEDY)[0].token_ids
    with pytest.raises(RequestError, match="text prompts need a tokenizer"):
        one.generate(["hello"], GREEDY)


def test_more_adapters_than_pool_slots(paths, llm):
    """Four adapters through a pool with two slots: requests wait for a slot, then all match the big engine."""
    base, adapters = paths
    small = LLM(base, dtype="float32", device="cpu", kv_block_size=4, max_active_adapters=2)
    for name, path in adapters.items():
        small.load_adapter(name, path)
    rows = list(adapters) * 2
    ps = prompts(len(rows), 9)
    assert [o.token_ids for o in small.generate(ps, GREEDY, rows)] == [o.token_ids for o in llm.generate(ps, GREEDY, rows)]
    assert len(small.pool.resident) <= 2


def test_adapter_larger_than_the_pool_is_refused(paths):
    base, adapters = paths
    tiny = LLM(base, dtype="float32", device="cpu", adapter_pool_bytes=64 * 4 * 8)
    with pytest.raises(ValueError, match="raise adapter_pool_bytes"):
        tiny.load_adapter("r8_all", adapters["r8_all"])


def test_unsupported_quantization_refused(tmp_path):
    base = save_model(tmp_path, "llama", tokenizer=False)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization gptq is not supported"):
        LLM(base, device="cpu")


def test_a_failed_step_ends_that_calls_requests_and_the_engine_goes_on(llm, monkeypatch):
    """If a step raises (a bug, an interrupt), generate ends its own requests, so the next call is not stuck
    behind them, and their KV blocks are free."""
    import lorax_core.engine.llm as engine

    calls = []

    def broken(logits, seqs):
        calls.append(len(seqs))
        raise RuntimeError("sampler broke")

    with monkeypatch.context() as m:
        m.setattr(engine, "launch", broken)
        with pytest.raises(RuntimeError, match="sampler broke"):
            llm.generate(prompts(3), GREEDY)
    assert calls and not llm.scheduler.running and not llm.scheduler.waiting
    assert llm.blocks.free_blocks == llm.blocks.num_blocks
    assert len(llm.generate(prompts(2), GREEDY)[1].token_ids) == GREEDY.max_tokens
