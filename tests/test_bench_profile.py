"""bench/profile_step.py: its CPU smoke mode profiles engine steps and reports the host ranges of a step."""
from bench_helpers import load_bench_script


def test_tiny_profile_reports_step_ranges(tmp_path):
    module = load_bench_script("profile_step")
    assert module.main(["--tiny", "--steps", "3", "--batch", "2", "--adapters", "2", "--rank", "4",
                        "--setups", "fp32,fp32-base-nopdl-sync-staged", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile.md").read_text()
    for name in ("lorax::step", "lorax::schedule", "lorax::prepare", "lorax::upload", "lorax::forward (eager)",
                 "lorax::logits", "lorax::take tokens (waits for their step)"):
        assert f"| {name} |" in text, text
    assert "## fp32\n" in text and "## fp32-base-nopdl-sync-staged\n" in text and "no adapter" in text
    assert "PDL off" in text and "NF4 GEMV staged" in text
    steps = [line for line in text.splitlines() if line.startswith("| lorax::step |")]
    assert len(steps) == 2 and all(step.split("|")[2].strip() == "1.0" for step in steps)  # one range per step
