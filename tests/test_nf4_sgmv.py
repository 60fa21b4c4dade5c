"""nf4_linear_sgmv: NF4 linear + LoRA (SGMV) + SwiGLU in one op, against the fp32 reference and against the ops it is
made of; its CUDA kernel (the GEMV with the LoRA expand and silu_mul in its epilogue) against the CPU op. And
add_rms_norm_sgmv_shrink, the norm before such a projection with its LoRA shrink, whose v the projection takes;
nf4_linear_sgmv_silu_shrink, gate | up with the shrink of its output for down; nf4_linear_sgmv_rotary."""
import pytest
import torch

from conftest import NF4_GEMV_MAX_ROWS, assert_close, assert_rounds_exact
from lora_helpers import linear_sgmv_case
from lorax_core.ops import add_rms_norm, add_rms_norm_sgmv_shrink, nf4_linear, nf4_linear_sgmv, nf4_linear_sgmv_rotary
from lorax_core.ops import nf4_linear_sgmv_silu_shrink
from lorax_core.ops import rotary_kv_cache_write, sgmv, silu_mul
from lorax_core.ops import reference as ref
from lorax_core.quant import NF4Weight
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
def test_cuda_matches_exact(case, dtype, gemv_staging):
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
def test_cuda_graph_capture(gemv_staging):
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


# ---------------------------------------- nf4_linear_sgmv_silu_shrink (gate | up, SwiGLU, the shrink for down)

MLP = {"gate_proj": (256, 96), "up_proj": (256, 96), "down_proj": (96, 256)}
MLP_CASES = [  # tokens, segment lengths, segment adapters (adapter 3 has gate only: no down, nothing to shrink)
    (1, [1], [0]),
    (1, [1], [2]),
    (1, [0, 1], [3, 1]),
    (1, [1], [-1]),
    (1, [1], [3]),
    (3, [1, 1, 1], [1, -1, 0]),
    (8, [2, 3, 3], [2, -1, 0]),
    (9, [3, 0, 4, 2], [0, 1, -1, 3]),
]


def mlp_case_id(case) -> str:
    tokens, _, seg = case
    return f"t{tokens}-{seg}"


def silu_shrink_case(case, dtype=torch.float32, device="cpu", modules=MLP):
    tokens, lengths, seg = case
    args, _ = linear_sgmv_case(modules, ["gate_proj", "up_proj"], RANKS, tokens, lengths, seg, dtype=dtype,
                               device=device)
    return args


def down_shrink(h, args):
    """sgmv_shrink of h for down_proj: what nf4_linear_sgmv(h, down, ...) would do first."""
    pool = args["pool"]
    return torch.ops.lorax_core.sgmv_shrink(h, pool.arena, pool.page_table, pool.ranks, args["seg_starts"],
                                            args["seg_slots"], args["layer"], [pool.module_index("down_proj")],
                                            pool.page_size)


@pytest.mark.parametrize("case", MLP_CASES, ids=mlp_case_id)
def test_silu_shrink_cpu_is_the_ops_and_the_reference(case):
    """h is nf4_linear_sgmv's with silu_mul, v the sgmv_shrink of h for down, bit for bit; v is h @ A_down.T of each
    row's adapter (zero past its rank, and for rows without one or whose adapter leaves down alone)."""
    tokens, lengths, seg = case
    for dtype in (torch.float32, torch.bfloat16):
        args = silu_shrink_case(case, dtype)
        h, v = nf4_linear_sgmv_silu_shrink(**args, next_modules="down_proj")
        assert torch.equal(h, nf4_linear_sgmv(**args, silu_mul=True))
        assert torch.equal(v, down_shrink(h, args))
    pool, rows = args["pool"], [a for a, n in zip(seg, lengths) for _ in range(n)]
    expected = torch.zeros(tokens, pool.page_table.shape[4])
    for t, slot in enumerate(rows):
        names = [f"a{i}" for i in range(len(RANKS)) if slot >= 0 and pool.slot(f"a{i}") == slot]
        if names and int(pool.ranks[slot, args["layer"], pool.module_index("down_proj")]) > 0:
            a_down = pool.dense(names[0], args["layer"], "down_proj")[0].float()
            expected[t, :a_down.shape[0]] = h[t].float() @ a_down.T
    assert_close(v, expected)
    assert torch.equal(v != 0, expected != 0)  # the zeros are exact


def test_silu_shrink_v_into_down_and_bad_inputs():
    """v handed to down's nf4_linear_sgmv gives down's own result; clear errors for what the op cannot do."""
    args = silu_shrink_case(MLP_CASES[-1], torch.bfloat16)
    h, v = nf4_linear_sgmv_silu_shrink(**args, next_modules=["down_proj"])
    from lorax_core.quant import NF4Weight

    down = NF4Weight.quantize(torch.randn(256, 96), 64, True)
    common = dict(w=down, bias=None, pool=args["pool"], layer=args["layer"], modules="down_proj",
                  seg_starts=args["seg_starts"], seg_slots=args["seg_slots"])
    assert torch.equal(nf4_linear_sgmv(h, **common, v=v), nf4_linear_sgmv(h, **common))
    w, pool = args["w"], args["pool"]
    state = (w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset, w.blocksize, w.nested_blocksize)
    lora = (pool.arena, pool.page_table, pool.ranks, pool.scales, args["seg_starts"], args["seg_slots"])
    op = torch.ops.lorax_core.nf4_linear_sgmv_silu_shrink
    down_i = pool.module_index("down_proj")
    with pytest.raises(RuntimeError, match="the LoRA arguments .* are required"):
        op(args["x"], *state, 192, None, *(None,) * 7, 1, [], [], 0, [down_i])
    with pytest.raises(RuntimeError, match="1 to 4 next modules, got 0"):
        op(args["x"], *state, 192, None, *lora, None, 1, [0, 1], [0, 96, 192], 64, [])
    with pytest.raises(RuntimeError, match="counters must be int32"):
        op(args["x"], *state, 192, None, *lora, None, 1, [0, 1], [0, 96, 192], 64, [down_i], torch.zeros(2))
    with pytest.raises(RuntimeError, match="silu_mul needs an even number of outputs"):
        op(args["x"], *state, 191, None, *lora, None, 1, [0, 1], [0, 96, 191], 64, [down_i])
    with pytest.raises(ValueError, match="module 'o_proj' is not in this pool"):
        nf4_linear_sgmv_silu_shrink(**args, next_modules="o_proj")
    counters = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(op.default, (args["x"], *state, 192, args["bias"], *lora, None, 1, [0, 1], [0, 96, 192],
                                       64, [down_i], counters))


def check_device_silu_shrink(case, dtype, device, run=lambda f: f(), modules=MLP):
    """The device op (counters given: the GEMV's epilogue shrinks, up to 8 rows) against the same device's ops: h
    bit for bit nf4_linear_sgmv's with silu_mul, v the shrink of that h up to the fp32 sums' order; the counters are
    left zero."""
    args = silu_shrink_case(case, dtype, device, modules)
    counters = torch.zeros(3, dtype=torch.int32, device=device)
    h, v = run(lambda: nf4_linear_sgmv_silu_shrink(**args, next_modules="down_proj", counters=counters))
    assert torch.equal(h, run(lambda: nf4_linear_sgmv(**args, silu_mul=True)))
    # fp32 sums of the same products in another order (8 outputs a tile, then the CTAs' shares), and with cancellation
    torch.testing.assert_close(v, run(lambda: down_shrink(h, args)), rtol=1e-4, atol=1e-4)
    assert not counters.any()
    return h, v


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MLP_CASES, ids=mlp_case_id)
def test_silu_shrink_cuda(case, dtype, gemv_staging):
    check_device_silu_shrink(case, dtype, "cuda")


@pytest.mark.cuda
def test_silu_shrink_cuda_graph_capture(gemv_staging):
    """The epilogue's shrink replays in a CUDA graph: its counter is back to zero after each call."""
    args = silu_shrink_case(MLP_CASES[0], torch.bfloat16, "cuda")
    counters = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = args["x"].clone()

    def call():
        return nf4_linear_sgmv_silu_shrink(**{**args, "x": x}, next_modules="down_proj", counters=counters)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, v = call()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        want_h, want_v = call()
        assert torch.equal(h, want_h) and torch.equal(v, want_v)
    assert not counters.any()


# ------------------------------------------------------- nf4_linear_sgmv_rotary (q | k | v, rotary, KV cache write)

# q | k | v cases; 1 to 8 rows take the GEMV on CUDA, 9 the ops one after the other
QKV_CASES = [case for case in CASES if case[0] == ["q_proj", "k_proj", "v_proj"]]
QKV_CASES.append((["q_proj", "k_proj", "v_proj"], 8, [2, 3, 3], [1, -1, 0]))
QKV_ODD = {"q_proj": (256, 192), "k_proj": (256, 48), "v_proj": (256, 48)}  # head_dim 48: not a power of two


def rotary_case(case, head_dim, dtype=torch.float32, device="cpu", modules=QKV, blocks=6, block_size=4):
    """nf4_linear_sgmv_rotary's arguments (as a dict for the wrapper): the LoRA case's, the heads, cos / sin tables
    of 40 positions, each row's position, caches of `blocks` blocks, and slots (the second row's -1: none)."""
    names, tokens, lengths, seg = case
    args, exact = linear_sgmv_case(modules, names, RANKS, tokens, lengths, seg, dtype=dtype, device=device)
    q_heads, kv_heads = modules["q_proj"][1] // head_dim, modules["k_proj"][1] // head_dim
    gen = torch.Generator().manual_seed(3)
    angles = torch.arange(40.0)[:, None] * 0.37 ** torch.arange(head_dim // 2.0)
    angles = torch.cat([angles, angles], dim=1)
    cache = (blocks, block_size, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    if tokens > 1:
        slots[1] = -1
    rotary = dict(q_heads=q_heads, kv_heads=kv_heads, cos=angles.cos().to(dtype), sin=angles.sin().to(dtype),
                  positions=torch.randint(0, 40, (tokens,), generator=gen), k_cache=torch.randn(cache, generator=gen),
                  v_cache=torch.randn(cache, generator=gen), slot_mapping=slots)
    rotary["k_cache"], rotary["v_cache"] = rotary["k_cache"].to(dtype), rotary["v_cache"].to(dtype)
    rotary = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rotary.items()}
    return dict(args, **rotary, v=None), exact


def rotary_op(a):
    return nf4_linear_sgmv_rotary(a["x"], a["w"], a["bias"], a["pool"], a["layer"], a["modules"], a["seg_starts"],
                                  a["seg_slots"], a["v"], a["q_heads"], a["kv_heads"], a["cos"], a["sin"],
                                  a["positions"], a["k_cache"], a["v_cache"], a["slot_mapping"])


def rotary_composed(a):
    """nf4_linear_sgmv, then rotary_kv_cache_write of its heads: the op's semantics, on a's own caches."""
    y = nf4_linear_sgmv(a["x"], a["w"], a["bias"], a["pool"], a["layer"], a["modules"], a["seg_starts"],
                        a["seg_slots"])
    d = a["cos"].shape[1]
    q, k, v = (p.view(y.shape[0], -1, d) for p in y.split([a["q_heads"] * d, a["kv_heads"] * d,
                                                           a["kv_heads"] * d], dim=1))
    rotary_kv_cache_write(q, k, v, a["cos"], a["sin"], a["positions"], a["k_cache"], a["v_cache"], a["slot_mapping"])
    return y


def fresh(a):
    return {**a, "k_cache": a["k_cache"].clone(), "v_cache": a["v_cache"].clone()}


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("case", QKV_CASES, ids=case_id)
def test_rotary_cpu_is_linear_sgmv_then_rotary_kv_cache_write(case, head_dim):
    for dtype in (torch.float32, torch.bfloat16):
        a, _ = rotary_case(case, head_dim, dtype)
        got, want = fresh(a), fresh(a)
        y = rotary_op(got)
        assert torch.equal(y, rotary_composed(want))
        assert torch.equal(got["k_cache"], want["k_cache"]) and torch.equal(got["v_cache"], want["v_cache"])
        assert not torch.equal(got["k_cache"], a["k_cache"])  # the rows with a slot were written


def test_rotary_cpu_matches_reference():
    case = QKV_CASES[0]
    a, _ = rotary_case(case, 32)
    names, tokens, lengths, seg = case
    pool, layer = a["pool"], a["layer"]
    weights, scales = {}, {}
    for i in range(len(RANKS)):
        slot = pool.slot(f"a{i}")
        parts = [pool.dense(f"a{i}", layer, n) for n in names]
        weights[slot], scales[slot] = parts, float(pool.scales[slot])
    got, want = fresh(a), fresh(a)
    y = rotary_op(got)
    rows = [s for s, n in zip(seg, lengths) for _ in range(n)]
    expected = ref.nf4_linear_sgmv_rotary(a["x"], a["w"].dequantize(torch.float32), a["bias"], rows,
                                          _block_weights(weights, names), scales, a["q_heads"], a["kv_heads"], a["cos"],
                                          a["sin"], a["positions"], want["k_cache"], want["v_cache"],
                                          a["slot_mapping"])
    assert_close(y, expected)
    assert_close(got["k_cache"], want["k_cache"])
    assert_close(got["v_cache"], want["v_cache"])


def _block_weights(weights, names):
    """{slot: [(A, B) per module]} -> {slot: (A stacked, B block-diagonal)}: ref.lora_delta's one pair per adapter."""
    out = {}
    for slot, parts in weights.items():
        a_rows = torch.cat([a for a, _ in parts])
        b = torch.zeros(sum(b.shape[0] for _, b in parts), a_rows.shape[0])
        r0, c0 = 0, 0
        for a_w, b_w in parts:
            b[r0:r0 + b_w.shape[0], c0:c0 + a_w.shape[0]] = b_w
            r0, c0 = r0 + b_w.shape[0], c0 + a_w.shape[0]
        out[slot] = (a_rows.float(), b.float())
    return out


def test_rotary_bad_inputs_and_opcheck():
    a, _ = rotary_case(QKV_CASES[-1], 32)
    with pytest.raises(RuntimeError, match="do not split into 5 q heads and 2 k and v heads"):
        rotary_op({**a, "q_heads": 5})
    with pytest.raises(RuntimeError, match="positions must be int64"):
        rotary_op({**a, "positions": a["positions"].int()})
    with pytest.raises(RuntimeError, match="slot_mapping must be int64"):
        rotary_op({**a, "slot_mapping": a["slot_mapping"][:1]})
    w, pool = a["w"], a["pool"]
    state = (w.codes, w.absmax, w.nested_code, w.nested_absmax, w.offset, w.blocksize, w.nested_blocksize)
    lora = (pool.arena, pool.page_table, pool.ranks, pool.scales, a["seg_starts"], a["seg_slots"], None)
    modules = [pool.module_index(n) for n in a["modules"]]
    torch.library.opcheck(torch.ops.lorax_core.nf4_linear_sgmv_rotary.default,
                          (a["x"], *state, w.shape[0], a["bias"], *lora, a["layer"], modules, [0, 256, 320, 384], 64,
                           a["q_heads"], a["kv_heads"], a["cos"], a["sin"], a["positions"], a["k_cache"],
                           a["v_cache"], a["slot_mapping"]))


def check_device_rotary(case, head_dim, dtype, device, run=lambda f: f(), modules=QKV):
    """The device op against the device's nf4_linear_sgmv followed by its rotary_kv_cache_write, bit for bit: the
    GEMV's epilogue rounds each output as nf4_linear_sgmv does, then rotates as the rotary op does."""
    a, _ = rotary_case(case, head_dim, dtype, device, modules=modules)
    got, want = fresh(a), fresh(a)
    y = run(lambda: rotary_op(got))
    expected = run(lambda: rotary_composed(want))
    assert torch.equal(y, expected)
    assert torch.equal(got["k_cache"], want["k_cache"]) and torch.equal(got["v_cache"], want["v_cache"])


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", QKV_CASES, ids=case_id)
def test_rotary_cuda_matches_the_ops(case, dtype, head_dim, gemv_staging):
    check_device_rotary(case, head_dim, dtype, "cuda")


@pytest.mark.cuda
def test_rotary_cuda_head_dim_not_a_power_of_two():
    check_device_rotary(QKV_CASES[0], 48, torch.bfloat16, "cuda", modules=QKV_ODD)


def check_device_fused_parts(m, dtype, device, run=lambda f: f()):
    """A fused weight whose parts keep their double quantization, each with its offset (NF4Weight.cat), computes on
    the device what the same weight with its absmax in fp32 computes, bit for bit (each block's absmax is the same
    fp32 value): nf4_linear of q | k | v (the GEMV up to 8 rows, then the GEMM, then dequantize + matmul), gate | up
    with SwiGLU (the GEMV pairs a gate row with an up row: two parts in one tile), and q | k | v with rotary and the
    cache write (pairs of head halves), LoRA on."""
    gen = torch.Generator().manual_seed(m)

    def fused(rows, k=256):
        parts = [NF4Weight.quantize(torch.randn(r, k, generator=gen) * (1 + i), 64, True) for i, r in enumerate(rows)]
        dq, fp32 = NF4Weight.cat(parts), NF4Weight.cat(parts, keep_double_quant=False)
        assert len(dq.part_starts) == len(rows) - 1 and not fp32.double_quant
        return dq.to(device), fp32.to(device)

    x = torch.randn(m, 256, generator=gen).to(dtype).to(device)
    qkv = fused((QKV["q_proj"][1], QKV["k_proj"][1], QKV["v_proj"][1]))
    assert torch.equal(*(run(lambda w=w: nf4_linear(x, w)) for w in qkv))
    gate_up = fused((128, 128))
    assert torch.equal(*(run(lambda w=w: nf4_linear_sgmv(x, w, silu_mul=True)) for w in gate_up))
    case = min((c for c in QKV_CASES if c[1] >= m), key=lambda c: c[1], default=QKV_CASES[3])  # 9 tokens: the ops
    a, _ = rotary_case(case, 64, dtype, device)
    (y0, a0), (y1, a1) = ((run(lambda b=b: rotary_op(b)), b) for b in (fresh({**a, "w": w}) for w in qkv))
    assert torch.equal(y0, y1)
    assert torch.equal(a0["k_cache"], a1["k_cache"]) and torch.equal(a0["v_cache"], a1["v_cache"])


@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_fused_parts_cpu(m):
    check_device_fused_parts(m, torch.float32, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 17, 40])
def test_fused_parts_cuda(m, dtype, gemv_staging):
    check_device_fused_parts(m, dtype, "cuda")
