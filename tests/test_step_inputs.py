"""A step's inputs in one buffer (lorax_core/engine/step_inputs.py), and decode steps over a CUDA graph's static
inputs run eagerly on the CPU (DecodeGraphs(capture=False)): the padding rows a graph replay computes must change
nothing."""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model_helpers import MIXED_ROWS, save_adapters, save_model
from lorax_core import LLM, SamplingParams
from lorax_core.engine.cuda_graphs import DecodeGraphs, buckets
from lorax_core.engine.step_inputs import Layout, upload

DTYPES = [torch.int32, torch.int64]


@st.composite
def fields(draw):
    n = draw(st.integers(1, 6))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        lo, hi = (-2**31, 2**31 - 1) if dtype == torch.int32 else (-2**63, 2**63 - 1)
        if draw(st.booleans()):
            rows, width = draw(st.integers(0, 4)), draw(st.integers(1, 5))
            used = draw(st.integers(0, rows))
            value = [draw(st.lists(st.integers(lo, hi), max_size=width)) for _ in range(used)]
            out[f"f{i}"] = (dtype, (rows, width), value, draw(st.integers(lo, hi)))
        else:
            size = draw(st.integers(0, 9))
            value = draw(st.lists(st.integers(lo, hi), max_size=size))
            out[f"f{i}"] = (dtype, (size,), value, draw(st.integers(lo, hi)))
    return out


@settings(max_examples=200, deadline=None)
@given(fields())
def test_layout_packs_each_field_with_its_fill(spec):
    layout = Layout([(name, dtype, shape) for name, (dtype, shape, _, _) in spec.items()])
    host = layout.pack({name: v for name, (_, _, v, _) in spec.items()}, {name: f for name, (*_, f) in spec.items()})
    assert host.dtype == torch.uint8 and host.numel() == layout.nbytes and layout.nbytes % 8 == 0
    views = layout.views(host)
    for name, (dtype, shape, value, fill) in spec.items():
        want = torch.full(shape, fill, dtype=dtype)
        for i, row in enumerate(value):
            if len(shape) == 2:
                want[i, :len(row)] = torch.tensor(row, dtype=dtype)
            else:
                want[i] = row
        assert views[name].dtype == dtype and views[name].data_ptr() % dtype.itemsize == 0
        assert torch.equal(views[name], want), name


def test_fields_do_not_overlap():
    layout = Layout([("a", torch.int32, (3,)), ("b", torch.int64, (2,)), ("c", torch.int32, (2, 3))])
    views = layout.views(layout.pack({"a": [1, 2, 3], "b": [-1, -2], "c": [[4, 5, 6], [7, 8]]}, {"c": 9}))
    assert views["a"].tolist() == [1, 2, 3] and views["b"].tolist() == [-1, -2]
    assert views["c"].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert layout.nbytes == 16 + 16 + 24


def test_upload_and_bad_fields():
    t = upload({"ids": (torch.int64, [5, 6, 7]), "table": (torch.int32, [[1, 2], [3, 4]]), "none": (torch.int64, [])},
               torch.device("cpu"))
    assert t["ids"].tolist() == [5, 6, 7] and t["table"].tolist() == [[1, 2], [3, 4]] and t["none"].numel() == 0
    with pytest.raises(TypeError, match="only int32 and int64"):
        Layout([("x", torch.float32, (2,))])


# --- decode steps over the static inputs of CUDA graphs, on the CPU -------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    base = save_model(root / "base", "mistral", hidden_size=64, intermediate_size=128)
    return base, save_adapters(base, root)


def generate(paths, static: bool, async_scheduling: bool = False):
    base, adapters = paths
    llm = LLM(base, kv_block_size=4, kv_cache_bytes=2**22, adapter_loader_threads=0, max_num_seqs=12,
              cuda_graphs=False, async_scheduling=async_scheduling)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    steps = []
    if static:
        runner = llm.runner
        runner.graphs = DecodeGraphs(runner.model, runner.pool, 12, -(-llm.max_model_len // 4), capture=False)
        run = runner.graphs.run
        runner.graphs.run = lambda b, previous=None: steps.append(len(b.input_ids)) or run(b, previous)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 30))] for _ in MIXED_ROWS]
    params = [SamplingParams(max_tokens=2 + i, temperature=0, ignore_eos=True, logprobs=0)
              for i in range(len(MIXED_ROWS))]
    with llm:
        return llm.generate(prompts, params, adapters=MIXED_ROWS), steps


def test_static_decode_inputs_equal_eager(paths):
    """Every decode step through a bucket's static inputs (padded to 1, 2, 4, 8 or 12 rows, block tables as wide as
    the longest context) gives the eager step's tokens and log-probabilities."""
    assert buckets(12) == [1, 2, 4, 8, 12]
    static, steps = generate(paths, static=True)
    eager, _ = generate(paths, static=False)
    # async scheduling: the static input ids of the previous step's tokens are filled on the device
    lagged, lagged_steps = generate(paths, static=True, async_scheduling=True)
    assert set(steps) >= {9, 7, 5, 3, 1} and set(lagged_steps) >= {9, 7, 5, 3, 1}  # padded batches, down to one row
    for outs in (static, lagged):
        assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
        for a, b in zip(outs, eager):
            torch.testing.assert_close([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], rtol=0,
                                       atol=1e-5)
