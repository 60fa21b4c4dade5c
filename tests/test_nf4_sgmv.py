"""nf4_linear_sgmv: NF4 linear + LoRA (SGMV) + SwiGLU in one op, against the fp32 reference and against the ops it is
made of; its CUDA kernel (the GEMV with the LoRA expand and silu_mul in its epilogue) against the CPU op. And
add_rms_norm_sgmv_shrink, the norm before such a projection with its LoRA shrink, whose v the projection takes."""
import pytest
import torch

from conftest import NF4_GEMV_MAX_ROWS, assert_close, assert_rounds_exact
from lora_helpers import linear_sgmv_case
from lorax_core.ops import add_rms_norm, add_rms_norm_sgmv_shrink, nf4_linear, nf4_linear_sgmv, sgmv, silu_mul
from lorax_core.ops import reference as ref
from test_layer_ops import assert_norm_same

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
    (["q_proj", "k_proj", "v_proj"], 5, [2, 0, 1, 2], [0, 1, -1, 3]),
    (["gate_proj", "up_proj"], 6, [6], [2]),
    (["gate_proj", "up_proj"], 3, [1, 1, 1], [1, -1, 0]),
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
        op(args["x"], *state, n, None, pool.arena, None, None, None, None, None, None, 1, [0, 1], [0, 256, n], 64,
           False)
    with pytest.raises(RuntimeError, match="columns must run from 0 to the 320 outputs"):
        op(args["x"], *state, n, None, *lora, None, 1, [0, 1], [0, 256, 300], 64, False)
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
                              (args["x"], *state, w.shape[0], args["bias"], *lora, None, 1, modules, [0, 96, 192], 64,
                               silu))


# ------------------------------------------------------------------------------------------- CUDA (a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_exact(case, dtype):
    check_device_op(case, dtype, "cuda")


def check_device_op(case, dtype, device, run=lambda f: f(), modules=QKV):
    """Up to NF4_GEMV_MAX_ROWS rows of x: the fused GEMV's outputs are the exact fp32 result with nf4_gemv_weight and
    each row's adapter rounded once (then silu_mul as the op rounds it); more rows: the ops one after the other, bit
    for bit. `run` runs the device op (the emulator's context)."""
    names, tokens, lengths, seg = case
    silu = names == ["gate_proj", "up_proj"]
    args, exact = linear_sgmv_case(modules, names, RANKS, tokens, lengths, seg, dtype=dtype, device=device)
    y = run(lambda: nf4_linear_sgmv(**args, silu_mul=silu))
    fused = tokens <= NF4_GEMV_MAX_ROWS
    if fused and not silu:
        assert_rounds_exact(y, exact)
    elif fused:  # gate and up each rounded once (an fp32 sum order may flip one by an ulp), then silu_mul's
        gate, up = exact.to(dtype).chunk(2, dim=-1)
        expected = silu_mul(gate.cpu(), up.cpu()).to(device)
        torch.testing.assert_close(y, expected, rtol=4 * torch.finfo(dtype).eps, atol=1e-5)
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


# ------------------------------------------------------------------- add_rms_norm_sgmv_shrink (the norm before)

def norm_shrink_case(names, tokens, lengths, seg, dtype=torch.float32, device="cpu", modules=QKV):
    """Inputs of add_rms_norm_sgmv_shrink (the LoRA case's pool and segments, x and residual of the modules' in)."""
    args, _ = linear_sgmv_case(modules, names, RANKS, tokens, lengths, seg, dtype=dtype, device=device)
    cols = args["x"].shape[1]
    gen = torch.Generator().manual_seed(7)
    residual = torch.randn(tokens, cols, generator=gen).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(cols, generator=gen)).to(dtype).to(device)
    return (args["x"], residual, weight, 1e-5, args["pool"], args["layer"], names, args["seg_starts"],
            args["seg_slots"])


def composed_norm_shrink(x, residual, weight, eps, pool, layer, names, starts, slots):
    out, s = add_rms_norm(x, residual, weight, eps)
    v = torch.ops.lorax_core.sgmv_shrink(out, pool.arena, pool.page_table, pool.ranks, starts, slots, layer,
                                         [pool.module_index(n) for n in names], pool.page_size)
    return out, s, v


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_norm_shrink_cpu_matches_reference_and_ops(case):
    names, tokens, lengths, seg = case
    for dtype in (torch.float32, torch.bfloat16):
        inputs = norm_shrink_case(names, tokens, lengths, seg, dtype=dtype)
        got = add_rms_norm_sgmv_shrink(*inputs)
        for g, e in zip(got, composed_norm_shrink(*inputs)):
            assert torch.equal(g, e)
    x, residual, weight, eps, pool, layer, *_ = inputs = norm_shrink_case(names, tokens, lengths, seg)
    rows = [a for s, a in enumerate(seg) for _ in range(lengths[s])]
    a_weights = [{pool.slot(f"a{i}"): pool.dense(f"a{i}", layer, n)[0] for i in range(len(RANKS))} for n in names]
    expected = ref.add_rms_norm_sgmv_shrink(x, residual, weight, eps, rows, a_weights, pool.page_table.shape[4])
    out, s, v = add_rms_norm_sgmv_shrink(*inputs)
    assert_close(out, expected[0])
    assert torch.equal(s, expected[1])
    assert_close(v, expected[2])


def test_norm_shrink_opcheck_and_v_into_the_projection():
    """The shrink done in the norm, handed to nf4_linear_sgmv as v: the same y as nf4_linear_sgmv shrinking x."""
    inputs = norm_shrink_case(["gate_proj", "up_proj"], 2, [1, 1], [0, -1])
    x, residual, weight, eps, pool, layer, names, starts, slots = inputs
    modules = [pool.module_index(n) for n in names]
    torch.library.opcheck(torch.ops.lorax_core.add_rms_norm_sgmv_shrink.default,
                          (x, residual, weight, eps, pool.arena, pool.page_table, pool.ranks, starts, slots, layer,
                           modules, pool.page_size))
    out, _, v = add_rms_norm_sgmv_shrink(*inputs)
    w = linear_sgmv_case(QKV, names, RANKS, 2, [1, 1], [0, -1])[0]["w"]
    common = (w, None, pool, layer, names, starts, slots)
    assert torch.equal(nf4_linear_sgmv(out, *common, silu_mul=True, v=v), nf4_linear_sgmv(out, *common, silu_mul=True))
    with pytest.raises(RuntimeError, match="v \\(the shrink of x\\) needs the LoRA arguments"):
        torch.ops.lorax_core.nf4_linear_sgmv(out, w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset,
                                             w.blocksize, w.nested_blocksize, w.shape[0], None, *(None,) * 6, v, 0, [],
                                             [], 0, False)


def check_device_norm_shrink(case, dtype, device, run=lambda f: f(), modules=QKV):
    """The device op against the CPU op: the residual sum bit for bit, the norm as RMSNorm's (its sum of squares in
    another order), v the fp32 shrink of the same normed values (up to the sum's order and a rare flipped element)."""
    names, tokens, lengths, seg = case
    inputs = norm_shrink_case(names, tokens, lengths, seg, dtype=dtype, device=device, modules=modules)
    out, s, v = run(lambda: add_rms_norm_sgmv_shrink(*inputs))
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs]
    cpu[4] = linear_sgmv_case(modules, names, RANKS, tokens, lengths, seg, dtype=dtype)[0]["pool"]
    e_out, e_s, e_v = add_rms_norm_sgmv_shrink(*cpu)
    assert torch.equal(s.cpu(), e_s)
    assert_norm_same(out.cpu(), e_out)
    torch.testing.assert_close(v.cpu(), e_v, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_norm_shrink_cuda_matches_cpu(case, dtype):
    check_device_norm_shrink(case, dtype, "cuda")
