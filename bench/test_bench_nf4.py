"""NF4 linear and dequantize on Mistral-7B shapes, against bf16 torch.matmul and bitsandbytes in the same run."""
import pytest
import torch

from conftest import copies_for, gpu_time_us, record, rotating

# (out, in) of Mistral-7B's projections: q/o, k/v, gate/up, down.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
M_VALUES = [1, 2, 4, 8, 16, 64, 512]  # 1..8: the GEMV (kGemvMaxM); 16: the tensor-core GEMM's smallest tile


def shape_name(n, k):
    return f"{n}x{k}"


@pytest.fixture(scope="module")
def weights():
    """Per shape: rotated NF4 weights (ours and bitsandbytes', the same bytes) and bf16 weights."""
    import bitsandbytes.functional as bnbf

    from lorax_core.quant import NF4Weight

    out = {}
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        nf4 = NF4Weight.quantize(w, 64, True)
        count = copies_for(nf4.nbytes)
        nf4s = [NF4Weight.quantize(torch.randn_like(w), 64, True) for _ in range(count)]
        bnbs = [nf4.to_bnb() for nf4 in nf4s]
        bf16s = [torch.randn_like(w) for _ in range(copies_for(w.numel() * 2))]
        out[(n, k)] = dict(nf4=nf4s, bnb=bnbs, bf16=bf16s, bnbf=bnbf)
    return out


def test_copy_bandwidth(benchmark):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us, _ = gpu_time_us(benchmark, lambda: dst.copy_(src), calls=4)
    record(kind="copy", shape="1GiB", impl="copy", us=us, gbps=2 * src.numel() / us / 1e3)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_name(*s))
@pytest.mark.parametrize("impl", ["lorax", "lorax_staged", "bf16", "bnb"])
def test_nf4_linear(benchmark, weights, impl, shape, m):
    """lorax_staged: the GEMV's other main loop (set_nf4_gemv_staging: loads staged in shared memory), up to 8 rows."""
    import bitsandbytes as bnb

    from lorax_core._library import set_nf4_gemv_staging
    from lorax_core.ops import nf4_linear

    n, k = shape
    w = weights[shape]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if impl == "lorax_staged" and m > 8:
        pytest.skip("the GEMV takes up to 8 rows")
    if impl in ("lorax", "lorax_staged"):
        nxt, calls = rotating(w["nf4"])
        fn = lambda: nf4_linear(x, nxt())  # noqa: E731
        nbytes = w["nf4"][0].nbytes + x.numel() * 2
    elif impl == "bf16":
        nxt, calls = rotating(w["bf16"])
        fn = lambda: torch.matmul(x, nxt().T)  # noqa: E731
        nbytes = n * k * 2 + x.numel() * 2
    else:
        nxt, calls = rotating(w["bnb"])

        def fn():
            packed, state = nxt()
            return bnb.matmul_4bit(x, packed.t(), quant_state=state)

        nbytes = w["nf4"][0].nbytes + x.numel() * 2
    was = set_nf4_gemv_staging(impl == "lorax_staged")  # read at each launch; the timed CUDA graph keeps it
    try:
        us, mode = gpu_time_us(benchmark, fn, calls)
    finally:
        set_nf4_gemv_staging(was)
    record(kind="nf4_linear", shape=shape_name(n, k), m=m, impl=impl, us=us, gbps=nbytes / us / 1e3, mode=mode)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_name(*s))
@pytest.mark.parametrize("impl", ["lorax", "bnb"])
def test_nf4_dequantize(benchmark, weights, impl, shape):
    n, k = shape
    w = weights[shape]
    if impl == "lorax":
        nxt, calls = rotating(w["nf4"])
        fn = lambda: nxt().dequantize(torch.bfloat16)  # noqa: E731
    else:
        nxt, calls = rotating(w["bnb"])

        def fn():
            packed, state = nxt()
            return w["bnbf"].dequantize_4bit(packed, state)

    us, mode = gpu_time_us(benchmark, fn, calls)
    nbytes = w["nf4"][0].nbytes + n * k * 2
    record(kind="nf4_dequantize", shape=shape_name(n, k), impl=impl, us=us, gbps=nbytes / us / 1e3, mode=mode)
