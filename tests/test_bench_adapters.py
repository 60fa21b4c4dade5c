"""bench/bench_adapters.py: its CPU smoke mode runs end to end, and the adapters it writes without PEFT are PEFT
adapters (PEFT loads every tensor of one into the right module)."""
import json

import torch
from safetensors.torch import load_file

from bench_helpers import load_bench_script
from model_helpers import save_model


def test_tiny_run_writes_one_row_per_adapter_count(tmp_path):
    bench = load_bench_script("bench_adapters")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "adapters.json").read_text())["rows"]
    assert [r["adapters"] for r in rows] == list(bench.TINY.counts)
    assert all(r["tokens_per_s"] > 0 and r["requests"] >= bench.TINY.requests for r in rows)
    assert all(r["host_loads"] == 0 for r in rows)  # the warm-up put every adapter in host memory
    table = [line for line in (tmp_path / "adapters.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(bench.TINY.counts)  # header + one row per n


def test_written_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bench = load_bench_script("bench_adapters")
    base = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / "base", tokenizer=False))
    shapes = bench.module_shapes(base.config)
    path = bench.write_adapter(tmp_path / "a0", shapes, base.config.num_hidden_layers, 8, torch.float32, seed=0)
    model = PeftModel.from_pretrained(base, path)
    assert model.peft_config["default"].r == 8 and set(model.peft_config["default"].target_modules) == set(shapes)
    loaded = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
    written = load_file(path / "adapter_model.safetensors")
    assert loaded.keys() == written.keys()
    for key, tensor in written.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
