"""bench/bench_host.py: its quick mode measures each part against its baseline and writes the table."""
import json

from bench_helpers import load_bench_script


def test_quick_host_bench_writes_its_table(tmp_path):
    module = load_bench_script("bench_host")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "host.json").read_text())
    assert [(r["part"], r["case"]) for r in rows] == [("detokenize a step", "completion of 100 tokens"),
                                                      ("decode a window of 2 tokens",
                                                       "transformers decode vs the Rust tokenizer's"),
                                                      ("a step's inputs to the device", "batch 8"),
                                                      ("sample a step (vocabulary 32000)", "batch 1, top-p 0.95")]
    assert all(r["baseline_us"] > 0 and r["lorax_us"] > 0 for r in rows)
    text = (tmp_path / "host.md").read_text()
    assert text.startswith("device: CPU") and "| detokenize a step | completion of 100 tokens |" in text


def test_baselines_send_what_lorax_sends():
    """The baseline and the packed upload put the same values on the device."""
    import torch

    module = load_bench_script("bench_host")
    b = module.decode_batch(5)
    old = module.per_field(b, torch.device("cpu"))
    new = module.packed(b, torch.device("cpu"))
    for name, i in [("input_ids", 0), ("positions", 1), ("slots", 2), ("block_tables", 4), ("context_lens", 5),
                    ("seg_starts", 6), ("seg_slots", 7)]:
        assert torch.equal(old[i], new[name]), name
