"""bench/bench_engine.py's choice of engines (the timing itself needs a GPU)."""
import pytest

from bench_helpers import load_bench_script


def test_only_picks_engines_and_names_the_unknown(capsys):
    module = load_bench_script("bench_engine")
    assert module.parse_args([]).only == ["hf", *module.ENGINES]
    assert module.parse_args(["--only", "nf4,hf,nf4-o-shrink-apart"]).only == ["nf4", "hf", "nf4-o-shrink-apart"]
    with pytest.raises(SystemExit):
        module.parse_args(["--only", "nf4,nf5"])
    assert "unknown engines ['nf5']" in capsys.readouterr().err
    quantize, kwargs = module.ENGINES["nf4-o-shrink-apart"]
    assert quantize == "nf4" and kwargs["o_shrink_apart"]
