"""`lorax-core demo`: the synthetic tasks, the word-level base, and one whole demo run on the CPU, which must reach
the LoRA Land headline (adapters over the base by >= 34 points on average, each adapter above the base)."""
import json

import pytest

from lorax_core.demo import tasks as T
from lorax_core.demo.base import make_tokenizer


@pytest.mark.parametrize("task", T.TASKS)
def test_tasks_hold_out_their_test_prompts(task):
    train, test = T.make_task(task, 500, 60, seed=3)
    assert len(train) == 500 and len(test) == 60
    assert all(r["task"] == task and r["prompt"] and r["completion"] for r in train + test)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    if task != "addition":  # (addition's test set cycles through its 25 held-out digit pairs)
        assert len({r["prompt"] for r in test}) == 60
    assert T.make_task(task, 500, 60, seed=3) == (train, test)  # reproducible


def test_word_tokenizer_covers_every_task_word():
    tok = make_tokenizer()
    records = [r for task in T.TASKS for part in T.make_task(task, 200, 20, 0) for r in part]
    texts = [r["prompt"] + " " + r["completion"] for r in records] + T.pretraining_text(200, 0)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    assert tok("add : 1 2 sum :")["input_ids"][0] == tok.bos_token_id


def test_demo_reaches_the_lora_land_headline(tmp_path):
    from lorax_core.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["task"]: r for r in results["tasks"]}
    assert set(rows) == set(T.TASKS)
    for r in rows.values():
        assert 0 <= r["base_score"] <= 100 and 0 <= r["adapter_score"] <= 100
        assert r["adapter_score"] > r["base_score"], r
    assert results["summary"]["mean_lift"] >= 34 and results["summary"]["goal_met"]
    serving = results["serving"]
    assert serving["requests"] == 2 * sum(r["n_test"] for r in rows.values()) and serving["tokens_per_s"] > 0
    same, total = map(int, serving["same_as_single_adapter_runs"].split("/"))
    assert same == total  # mixed-adapter batches give each row what its adapter alone gives
    for task in T.TASKS:  # standard PEFT adapter directories
        assert (out / "adapters" / task / "adapter_config.json").is_file()
        assert (out / "adapters" / task / "adapter_model.safetensors").is_file()
