"""The adapter registry and its tiers: registration validates eagerly, weights load in the background without
stalling the running batch, the host tier keeps to its budget, unload / listing / counters, and an adapter
that breaks after registration fails only its own requests."""
import shutil
import threading

import pytest

from model_helpers import ADAPTERS, save_adapter, save_adapters, save_model
from lorax_core import LLM, SamplingParams
from lorax_core.adapters import Tier

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    base = save_model(root / "base", "llama", tokenizer=False)
    return base, save_adapters(base, root)


def engine(paths, **options) -> LLM:
    base, adapters = paths
    llm = LLM(base, dtype="float32", device="cpu", kv_block_size=4, **options)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm


@pytest.fixture(scope="module")
def reference(paths):
    """Outputs of a healthy engine: PROMPTS with r8_all, r4_qv and the base model."""
    outs = engine(paths).generate(PROMPTS, GREEDY, ["r8_all", "r4_qv", None])
    return [o.token_ids for o in outs]


def test_tiers_and_counters(paths):
    llm = engine(paths)
    infos = {i.name: i for i in llm.list_adapters()}
    assert set(infos) == set(ADAPTERS) and all(i.tier is Tier.DISK and i.host_bytes == 0 for i in infos.values())
    assert infos["r8_all"].rank == 8 and infos["r8_all"].scale == 2.0 and len(infos["r8_all"].target_modules) == 7
    llm.generate(PROMPTS, GREEDY, ["r8_all", "r8_all", "r4_qv"])
    infos = {i.name: i for i in llm.list_adapters()}
    r8 = infos["r8_all"]
    assert r8.tier is Tier.DEVICE and r8.host_bytes > 0
    assert (r8.stats.requests, r8.stats.prompt_tokens, r8.stats.generated_tokens) == (2, 7, 12)
    assert (r8.stats.host_loads, r8.stats.device_loads, r8.stats.failures) == (1, 1, 0) and r8.stats.queue_time_s >= 0
    assert infos["r16_rslora"].tier is Tier.DISK and infos["r16_rslora"].stats.requests == 0


def test_loading_does_not_stall_the_running_batch(paths, monkeypatch):
    llm = engine(paths)
    gate = threading.Event()
    stage = llm.registry._stage
    monkeypatch.setattr(llm.registry, "_stage", lambda spec: (gate.wait(10), stage(spec))[1])
    running = llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    waiting = llm.add_request(PROMPTS[1], GREEDY, "r8_all")
    for _ in range(3):
        assert llm.step() == [running]  # the base request advances while r8_all is read from disk
    assert {i.name: i.tier for i in llm.list_adapters()}["r8_all"] is Tier.LOADING
    gate.set()
    while not waiting.finished:
        llm.step()
    assert running.num_completion_tokens == 6 and waiting.num_completion_tokens == 6


def test_host_tier_keeps_to_its_budget(paths):
    llm = engine(paths, host_adapter_cache_bytes=1, max_active_adapters=1)
    names = list(ADAPTERS)
    outs = llm.generate(PROMPTS * 2, GREEDY, names + names[:2])
    assert all(o.finish_reason == "length" for o in outs)
    assert len(llm.registry._host) == 1  # only the newest stays when one adapter exceeds the budget
    assert sum(i.stats.host_loads for i in llm.list_adapters()) >= len(names) + 1  # evicted ones reloaded


def test_unload_and_replace(paths, reference):
    base, adapters = paths
    llm = engine(paths)
    seq = llm.add_request(PROMPTS[0], GREEDY, "r8_all")
    with pytest.raises(ValueError, match="'r8_all' has 1 unfinished request.*before you unload it"):
        llm.unload_adapter("r8_all")
    with pytest.raises(ValueError, match="before you replace it"):
        llm.load_adapter("r8_all", adapters["r4_qv"])
    llm.abort(seq)
    assert seq.finish_reason == "abort"
    llm.unload_adapter("r8_all")
    assert "r8_all" not in {i.name for i in llm.list_adapters()}
    with pytest.raises(ValueError, match="unknown adapter 'r8_all'.*load_adapter"):
        llm.add_request(PROMPTS[0], GREEDY, "r8_all")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.unload_adapter("nope")
    # Registered again under the same name (and another adapter replaced in place): served as before.
    llm.load_adapter("r8_all", adapters["r8_all"])
    llm.load_adapter("r4_qv", adapters["r4_qv"])
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, ["r8_all", "r4_qv", None])] == reference
    assert llm.pool.free_pages + sum(len(e.pages) for e in llm.pool._resident.values()) == llm.pool.num_pages


def test_hub_adapter_offline_is_refused(paths, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = engine(paths)
    with pytest.raises(ValueError, match="adapter 'sql'.*could not be fetched from the Hugging Face hub"):
        llm.load_adapter("sql", "no-such-org/no-such-adapter")


def test_adapter_with_nan_weights_fails_only_its_requests(paths, reference, tmp_path):
    """Its header is valid, so load_adapter takes it; reading its weights finds the NaN and fails its requests,
    saying so."""
    from safetensors.torch import load_file, save_file

    _, adapters = paths
    llm = engine(paths)
    shutil.copytree(adapters["r8_all"], tmp_path / "nan")
    weights = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    llm.load_adapter("diverged", tmp_path / "nan")
    outs = llm.generate(PROMPTS + [PROMPTS[0]], GREEDY, ["r8_all", "r4_qv", None, "diverged"])
    assert [o.token_ids for o in outs[:3]] == reference
    assert outs[3].finish_reason == "error" and "NaN or infinite" in outs[3].error and "diverged" in outs[3].error


@pytest.mark.parametrize("breakage", ["truncated", "deleted", "other_base"])
def test_adapter_broken_after_registration_fails_only_its_requests(paths, reference, tmp_path, breakage):
    base, adapters = paths
    llm = engine(paths)
    shutil.copytree(adapters["r8_all"], tmp_path / "copy")
    llm.load_adapter("fragile", tmp_path / "copy")
    weights = tmp_path / "copy" / "adapter_model.safetensors"
    if breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif breakage == "deleted":
        weights.unlink()
    else:  # a valid adapter of another rank in its place
        save_adapter(base, tmp_path / "other", r=2, lora_alpha=4, target_modules=["q_proj"])
        shutil.copy(tmp_path / "other" / "adapter_model.safetensors", weights)
    outs = llm.generate(PROMPTS + [PROMPTS[0]], GREEDY, ["r8_all", "r4_qv", None, "fragile"])
    assert [o.token_ids for o in outs[:3]] == reference
    failed = outs[3]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert "adapter 'fragile'" in failed.error and "register it again with load_adapter" in failed.error
    info = {i.name: i for i in llm.list_adapters()}["fragile"]
    assert info.stats.failures == 1 and info.error == failed.error and info.tier is Tier.DISK
    # Streaming reports the failure too; then the file is restored and the adapter serves again.
    deltas = list(llm.stream(PROMPTS[0], GREEDY, "fragile"))
    assert deltas[-1].finish_reason == "error" and "fragile" in deltas[-1].error
    shutil.copy(adapters["r8_all"] / "adapter_model.safetensors", weights)
    assert llm.generate([PROMPTS[0]], GREEDY, ["fragile"])[0].token_ids == reference[0]
    assert llm.blocks.free_blocks == llm.blocks.num_blocks and not llm.scheduler.demand


def test_new_engine_options_validated(paths):
    base, _ = paths
    for option, value, message in [("adapter_loader_threads", -1, "adapter_loader_threads must be"),
                                   ("adapter_time_slice_s", -2.0, "adapter_time_slice_s must be"),
                                   ("host_adapter_cache_bytes", 0, "host_adapter_cache_bytes must be")]:
        with pytest.raises(ValueError, match=message):
            LLM(base, device="cpu", **{option: value})
