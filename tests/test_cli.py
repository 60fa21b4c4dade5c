"""The command line's main job runs and reports sane numbers."""
from lorax_core.cli import main


def test_nf4_example_runs(capsys):
    assert main(["nf4-example", "--in-features", "256", "--out-features", "128", "--tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "x smaller" in out and "relative error" in out
