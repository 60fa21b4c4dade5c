"""lorax-train / lorax-eval on a tiny base built here: training lowers the loss, the adapter is a standard PEFT
directory, the engine's greedy outputs with it equal PEFT's (fp32 base and NF4 base), and an interrupted run
resumed from its checkpoint ends at the same adapter as an uninterrupted one."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from model_helpers import bnb_config, hf_greedy_mixed, hf_peft_model, make_tokenizer, save_model
from lorax_core import LLM, SamplingParams
from lorax_train import PRESETS, TrainConfig, train
from lorax_train.cli import eval_main, train_main
from lorax_train.data import load_dataset, prompt_and_completion
from lorax_train.evaluate import evaluate
from lorax_train.trainer import mean_loss

WORDS = "red green blue cat dog bird".split()


PAIRS = dict(zip(WORDS, "cat dog bird red green blue".split()))


def write_task(path, n=32, seed=0):
    """A learnable task: 'a b is' -> ' f(a) f(b)' for a fixed word map f."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(WORDS, 2)
            record = {"prompt": f"{a} {b} is", "completion": f" {PAIRS[a]} {PAIRS[b]}", "task": "swap"}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return save_model(root / "base", "llama"), write_task(root / "swap.jsonl"), root


def config(tiny, out, **overrides):
    base, data, _ = tiny
    settings = dict(base=str(base), data=str(data), out=str(out), steps=24, lr=1e-2, batch_size=4, save_every=0,
                    load_in_4bit=False, device="cpu")
    return TrainConfig.build(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny):
    """One fp32-base and one NF4-base (QLoRA) run of 24 steps."""
    _, _, root = tiny
    return {quant: train(config(tiny, root / f"out_{quant}", load_in_4bit=quant == "nf4"), log=lambda *_: None)
            for quant in ("fp32", "nf4")}


def peft_model(base, adapter_dir, quant="fp32"):
    """transformers + PEFT with the adapter on the fp32 base, or on the bitsandbytes NF4 base."""
    kwargs = dict(quantization_config=bnb_config(), device_map="cpu") if quant == "nf4" else {}
    return hf_peft_model(base, {"t": adapter_dir}, dtype=torch.float32, **kwargs)


def completion_losses(model, data):
    """Mean completion loss on the task's records with the adapter and without it."""
    examples = load_dataset(data, make_tokenizer(), "{prompt}", 64, 0.0, 0).train
    with_adapter = mean_loss(model, examples, 8, 0, torch.device("cpu"))
    with model.disable_adapter():
        return with_adapter, mean_loss(model, examples, 8, 0, torch.device("cpu"))


def test_lora_land_preset_is_the_reports_recipe():
    preset = TrainConfig.build()
    assert (preset.rank, preset.lr, preset.steps, preset.batch_size) == (8, 2e-3, 40_000, 1)
    assert preset.load_in_4bit and preset.gradient_checkpointing and PRESETS["lora-land"]["load_in_4bit"]
    assert preset.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_settings_precedence_and_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"rank": 16, "lr": 1e-4}))
    c = TrainConfig.build("lora-land", tmp_path / "c.json", lr=5e-4, steps=None)
    assert (c.rank, c.lr, c.steps) == (16, 5e-4, 40_000)  # file over preset, flags over file, None ignored
    with pytest.raises(ValueError, match="unknown training settings: rnak"):
        TrainConfig.build(rnak=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        TrainConfig.build(dropout=1.5)


def test_training_lowers_the_loss_and_peft_loads_the_adapter(tiny, trained):
    base, data, _ = tiny
    for quant, result in trained.items():
        assert result.finished and result.steps == 24
        assert (result.adapter_dir / "adapter_config.json").is_file()
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
        with_adapter, without = completion_losses(peft_model(base, result.adapter_dir, quant), data)
        assert with_adapter < 0.6 * without, (quant, with_adapter, without)  # measured: 2.2 vs 5.9 (fp32)


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_engine_serves_the_trained_adapter_as_peft_does(tiny, trained, quant):
    """Train/serve parity: greedy tokens of the engine with the adapter == transformers + PEFT on the same base."""
    base, data, _ = tiny
    adapter = trained[quant].adapter_dir
    tok = make_tokenizer()
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in open(data)][:8]
    rows = ["t", None] * 4
    hf = peft_model(base, adapter, quant)
    llm = LLM(base, dtype="float32", device="cpu", quantize="nf4" if quant == "nf4" else None,
              adapter_loader_threads=0)
    llm.load_adapter("t", adapter)
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                              adapters=rows)]
    theirs = hf_greedy_mixed(hf, prompts, rows, 4)
    same = sum(a == b for a, b in zip(ours, theirs))
    # fp32: identical; NF4: the same NF4 bytes on both sides, fp32 summation order may flip a near-tie (1 in 8)
    assert same == len(rows) if quant == "fp32" else same >= len(rows) - 1, (ours, theirs)
    assert sum(ours[i] != ours[i + 1] for i in range(0, 8, 2)) >= 2  # the adapter changes what is generated


def test_resumed_run_ends_at_the_same_adapter(tiny, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    straight = train(config(tiny, tmp_path / "a", steps=6, save_every=2, dropout=0.1), log=quiet)
    first = train(config(tiny, tmp_path / "b", steps=6, save_every=2, dropout=0.1), stop_after=3, log=quiet)
    assert not first.finished and first.steps == 3
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed = train(config(tiny, tmp_path / "b", steps=6, save_every=2, dropout=0.1), log=quiet)
    assert resumed.finished and resumed.steps == 6
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings \\(rank\\)"):
        train(config(tiny, tmp_path / "b", steps=8, save_every=2, dropout=0.1, rank=4), stop_after=1, log=quiet)


def test_bad_data_gets_clear_errors_or_a_skip_count(tmp_path):
    tok = make_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "red", "completion": " cat"}\n{"prompt": "red"}\n')
    with pytest.raises(ValueError, match="record 2: needs string fields 'prompt' and 'completion'"):
        load_dataset(bad, tok, "{prompt}", 64, 0.0, 0)
    bad.write_text('{"prompt": "red", "completion": " cat"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_dataset(bad, tok, "{prompt}", 64, 0.0, 0)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="has no records"):
        load_dataset(bad, tok, "{prompt}", 64, 0.0, 0)
    long = " ".join(["red cat"] * 40)
    bad.write_text(json.dumps({"prompt": long, "completion": " dog"}) + "\n"
                   + json.dumps({"prompt": "red", "completion": " dog " * 40}) + "\n")
    data = load_dataset(bad, tok, "{prompt}", 16, 0.0, 0)
    assert (data.skipped, data.truncated, len(data.train)) == (1, 1, 1) and len(data.train[0].input_ids) == 16
    with pytest.raises(ValueError, match="the template 'Q: {question}' does not fit"):
        load_dataset(write_task(tmp_path / "ok.jsonl", 2), tok, "Q: {question}", 64, 0.0, 0)


def test_chat_messages(tmp_path):
    tok = make_tokenizer()
    messages = {"messages": [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "dog"}]}
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        prompt_and_completion(messages, "{prompt}", tok, "x")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    assert prompt_and_completion(messages, "{prompt}", tok, "x") == ("user: red cat\nassistant:", "dog")


def test_cli_train_then_eval(tiny, trained, tmp_path, capsys):
    base, data, _ = tiny
    assert train_main(["--base", str(base), "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "2",
                       "--no-load-in-4bit", "--device", "cpu", "--target-modules", "q_proj,v_proj"]) == 0
    saved = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["r"] == 8
    assert train_main(["--base", str(base), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"),
                       "--steps", "1", "--no-load-in-4bit"]) == 2
    assert "no such file" in capsys.readouterr().err
    # lorax-eval: score a test set built from the engine's own greedy outputs, so the expected table is known:
    # task "base" expects what the base generates, task "adapter" what the adapter generates (prompts where they
    # differ)
    adapter = trained["fp32"].adapter_dir
    first = evaluate(str(base), data, {"swap": adapter}, max_tokens=4, device="cpu", dtype="float32")
    differ = [i for i, (a, b) in enumerate(zip(first.outputs["base"], first.outputs["swap"])) if a.strip() != b.strip()]
    assert len(differ) >= 4
    records = [json.loads(line) for line in open(data)]
    test = tmp_path / "test.jsonl"
    with open(test, "w") as f:
        for i in differ[:4]:
            task, model = ("base", "base") if i in differ[:2] else ("adapter", "swap")
            f.write(json.dumps({"prompt": records[i]["prompt"], "completion": first.outputs[model][i],
                                "task": task}) + "\n")
    assert eval_main(["--base", str(base), "--data", str(test), "--adapter", f"swap={adapter}", "--max-tokens", "4",
                      "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "| task | n | base | swap |" in out and "| adapter | 2 | 0.000 | 1.000 |" in out
    assert "| base | 2 | 1.000 | 0.000 |" in out
    assert json.loads((tmp_path / "e.json").read_text())["scores"]["adapter"] == {"base": 0.0, "swap": 1.0}


@pytest.mark.cuda
def test_qlora_training_on_cuda(tiny, tmp_path):
    """The lora-land path on a GPU: NF4 base (bitsandbytes CUDA kernels), bf16 compute, gradient checkpointing;
    the adapter it writes lowers the loss when PEFT loads it on the CPU."""
    base, data, _ = tiny
    result = train(config(tiny, tmp_path / "gpu", load_in_4bit=True, device="cuda"), log=lambda *_: None)
    with_adapter, without = completion_losses(peft_model(base, result.adapter_dir), data)
    assert with_adapter < 0.6 * without, (with_adapter, without)
