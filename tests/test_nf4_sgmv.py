"""nf4_linear_sgmv: NF4 linear + LoRA (SGMV) + SwiGLU in one op, against the fp32 reference and against the ops it is
made of; its CUDA kernel (the GEMV with the LoRA expand and silu_mul in its epilogue) against the CPU op."""
import pytest
import torch

from conftest import assert_close, assert_rounds_exact
from lora_helpers import linear_sgmv_case
from lorax_core.ops import nf4_linear, nf4_linear_sgmv, sgmv, silu_mul

QKV = {"q_proj": (256, 256), "k_proj": (256, 64), "v_proj": (256, 64), "gate_proj": (256, 96), "up_proj": (256, 96)}
RANKS = [[8], [1, 16], [128], [4, 32]]  # the last adapter touches only the first module of a call


def composed(args, silu: bool) -> torch.Tensor:
    """The ops one after the other: what the op does off its fused CUDA path."""
    y = nf4_linear(args["x"], args["w"], args["bias"])
    sgmv(y, args["x"], args["pool"], args["layer"], args["modules"], args["seg_starts"], args["seg_slots"])
    return silu_mul(*y.chunk(2, dim=-1)) if silu else y


CASES = [  # names, tokens, segment lengths, segment adapters
    (["q_proj", "k_proj", "v_proj"], 1, [1], [1]),
    (["q_proj", "k_proj", "v_proj"], 1, [0, 1, 0], [2, 3, -1]),
    (["q_proj", "k_proj", "v_proj"], 1, [1], [-1]),
    (["gate_proj", "up_proj"], 1, [1], [0]),
    (["gate_proj", "up_proj"], 1, [1], [3]),
    (["q_proj"], 1, [1], [2]),
    (["q_proj", "k_proj", "v_proj"], 9, [3, 0, 4, 2], [0, 1, -1, 3]),
    (["gate_proj", "up_proj"], 6, [6], [2]),
]


def case_id(case) -> str:
    names, tokens, _, seg = case
    return f"{'+'.join(names)}-t{tokens}-{seg}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_matches_reference(case):
    names, tokens, lengths, seg = case
    args, exact = linear_sgmv_case(QKV, names, RANKS, tokens, lengths, seg)
    assert_close(nf4_linear_sgmv(**args), exact)
    if names == ["gate_proj", "up_proj"]:  # silu_mul pairs gate and up
        gate, up = exact.chunk(2, dim=-1)
        assert_close(nf4_linear_sgmv(**args, silu_mul=True), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_is_the_ops_one_after_the_other(dtype):
    for names, tokens, lengths, seg in CASES:
        args, _ = linear_sgmv_case(QKV, names, RANKS, tokens, lengths, seg, dtype=dtype)
        silu = names == ["gate_proj", "up_proj"]
        assert torch.equal(nf4_linear_sgmv(**args, silu_mul=silu), composed(args, silu))


def test_without_lora_is_nf4_linear_then_silu_mul():
    args, _ = linear_sgmv_case(QKV, ["gate_proj", "up_proj"], RANKS, 3, [3], [0], dtype=torch.bfloat16)
    y = nf4_linear(args["x"], args["w"], args["bias"])
    assert torch.equal(nf4_linear_sgmv(args["x"], args["w"], args["bias"]), y)
    assert torch.equal(nf4_linear_sgmv(args["x"], args["w"], args["bias"], silu_mul=True), silu_mul(*y.chunk(2, -1)))


def test_bad_inputs_get_clear_errors():
    args, _ = linear_sgmv_case(QKV, ["q_proj", "k_proj"], RANKS, 2, [2], [0])
    state = (args["w"].codes, args["w"].absmax, args["w"].nested_code, args["w"].nested_absmax, args["w"].offset,
             args["w"].blocksize, args["w"].nested_blocksize)
    pool = args["pool"]
    lora = (pool.arena, pool.page_table, pool.ranks, pool.scales, args["seg_starts"], args["seg_slots"])
    op = torch.ops.lorax_core.nf4_linear_sgmv
    n = args["w"].shape[0]
    with pytest.raises(RuntimeError, match="all together, or none"):
        op(args["x"], *state, n, None, pool.arena, None, None, None, None, None, 1, [0, 1], [0, 256, n], 64, False)
    with pytest.raises(RuntimeError, match="columns must run from 0 to the 320 outputs"):
        op(args["x"], *state, n, None, *lora, 1, [0, 1], [0, 256, 300], 64, False)
    with pytest.raises(RuntimeError, match="silu_mul needs an even number of outputs"):
        w = linear_sgmv_case(QKV, ["k_proj"], RANKS, 1, [1], [0])[0]["w"]
        odd = type(w).quantize(torch.randn(63, 256), 64, True)
        nf4_linear_sgmv(args["x"], odd, silu_mul=True)
    with pytest.raises(ValueError, match="y has 320 columns; the outputs of \\['q_proj'\\] take 256"):
        nf4_linear_sgmv(**{**args, "modules": ["q_proj"]})
    with pytest.raises(ValueError, match="x has 256 features, the weight expects 128"):
        nf4_linear_sgmv(args["x"], type(args["w"]).quantize(torch.randn(64, 128), 64, True))


def test_opcheck():
    args, _ = linear_sgmv_case(QKV, ["gate_proj", "up_proj"], RANKS, 2, [1, 1], [0, -1])
    w, pool = args["w"], args["pool"]
    state = (w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset, w.blocksize, w.nested_blocksize)
    lora = (pool.arena, pool.page_table, pool.ranks, pool.scales, args["seg_starts"], args["seg_slots"])
    modules = [pool.module_index(n) for n in args["modules"]]
    for silu in (False, True):
        torch.library.opcheck(torch.ops.lorax_core.nf4_linear_sgmv.default,
                              (args["x"], *state, w.shape[0], args["bias"], *lora, 1, modules, [0, 96, 192], 64, silu))


# ------------------------------------------------------------------------------------------- CUDA (a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_exact(case, dtype):
    check_device_op(case, dtype, "cuda")


def check_device_op(case, dtype, device, run=lambda f: f(), modules=QKV):
    """One row of x: the fused GEMV's outputs are the exact fp32 result rounded once (then silu_mul as the op rounds
    it); more rows: the ops one after the other, bit for bit. `run` runs the device op (the emulator's context)."""
    names, tokens, lengths, seg = case
    silu = names == ["gate_proj", "up_proj"]
    args, exact = linear_sgmv_case(modules, names, RANKS, tokens, lengths, seg, dtype=dtype, device=device)
    y = run(lambda: nf4_linear_sgmv(**args, silu_mul=silu))
    if tokens == 1 and not silu:
        assert_rounds_exact(y, exact)
    elif tokens == 1:
        gate, up = exact.to(dtype).chunk(2, dim=-1)  # each rounded once, then silu_mul's roundings
        assert_close(y, silu_mul(gate.cpu(), up.cpu()).to(device), scale=0.1)
    else:
        assert torch.equal(y, run(lambda: composed(args, silu)))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """The fused path (shrink + GEMV) replays in a CUDA graph with new inputs copied in."""
    args, _ = linear_sgmv_case(QKV, ["gate_proj", "up_proj"], RANKS, 1, [1], [2], dtype=torch.bfloat16, device="cuda")
    x = args["x"].clone()
    nf4_linear_sgmv(**args, silu_mul=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_linear_sgmv(**{**args, "x": x}, silu_mul=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, nf4_linear_sgmv(**{**args, "x": x}, silu_mul=True), rtol=0, atol=0)
