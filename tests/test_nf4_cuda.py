"""NF4 CUDA kernels against the CPU kernels and the fp32 reference (skipped without a GPU)."""
import pytest
import torch

from conftest import FLOAT_DTYPES, NF4_GEMV_MAX_ROWS, assert_close, assert_nf4_linear, assert_rounds_exact, nf4_gemv_weight
from lorax_core.ops import nf4_linear
from lorax_core.ops import reference as ref
from lorax_core.quant import NF4Linear, NF4Weight

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (7,), (300, 129), (4096, 512)])
def test_quantize_cuda_equals_cpu(dtype, blocksize, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    codes, absmax = torch.ops.lorax_core.nf4_quantize(x.cuda(), blocksize)
    cpu_codes, cpu_absmax = torch.ops.lorax_core.nf4_quantize(x, blocksize)
    assert torch.equal(codes.cpu(), cpu_codes) and torch.equal(absmax.cpu(), cpu_absmax)


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 70000])
def test_quantize_absmax_cuda_equals_cpu(n):
    a = torch.randn(n) * 0.1
    code = ref.dynamic_map()
    q, a2 = torch.ops.lorax_core.nf4_quantize_absmax(a.cuda(), code.cuda(), 256)
    cq, ca2 = torch.ops.lorax_core.nf4_quantize_absmax(a, code, 256)
    assert torch.equal(q.cpu(), cq) and torch.equal(a2.cpu(), ca2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 1024])
@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (5,), (1024, 4096)])
def test_dequantize_cuda_equals_cpu(dtype, double_quant, blocksize, shape):
    w = NF4Weight.quantize(torch.randn(shape), blocksize, double_quant)
    assert torch.equal(w.to("cuda").dequantize(dtype).cpu(), w.dequantize(dtype))


def test_quantize_on_cuda_matches_cpu_weight():
    x = torch.randn(512, 1024)
    wc, wg = NF4Weight.quantize(x, 64, True), NF4Weight.quantize(x.cuda(), 64, True)
    assert torch.equal(wg.codes.cpu(), wc.codes)
    # the offset is a mean, summed in another order on the GPU: equal up to rounding
    torch.testing.assert_close(wg.absmax_fp32().cpu(), wc.absmax_fp32(), rtol=1e-5, atol=1e-6)


M_VALUES = [1, 2, 3, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 200]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 512), (48, 384), (1024, 4096), (16, 128)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_linear_cuda_matches_reference(dtype, shape, blocksize, gemv_staging):
    n, k = shape
    w = NF4Weight.quantize(torch.randn(n, k), blocksize, True).to("cuda")
    for m in M_VALUES:
        x = torch.randn(m, k, device="cuda").to(dtype)
        y = nf4_linear(x, w)
        assert y.shape == (m, n) and y.dtype == dtype
        assert_nf4_linear(y, x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 14336), (7, 96)])
def test_linear_cuda_few_rows_round_the_exact_product(dtype, shape, gemv_staging):
    """Up to NF4_GEMV_MAX_ROWS rows take the GEMV, which multiplies x by the NF4 values in x's dtype and scales in
    fp32: x @ W'.T in fp32 (W' = nf4_gemv_weight), rounded once."""
    n, k = shape
    w = NF4Weight.quantize(torch.randn(n, k), 64, True).to("cuda")
    exact_w = nf4_gemv_weight(w, dtype)
    for m in range(1, NF4_GEMV_MAX_ROWS + 1):
        x = torch.randn(m, k, device="cuda").to(dtype)
        exact = x.float() @ exact_w.T
        assert_rounds_exact(nf4_linear(x, w), exact, magnitude=x.float().abs() @ exact_w.abs().T)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(33, 100), (40, 200), (64, 96)])
def test_linear_cuda_other_shapes_and_fp32(dtype, shape):
    n, k = shape
    w = NF4Weight.quantize(torch.randn(n, k), 32, True).to("cuda")
    x = torch.randn(5, k, device="cuda").to(dtype)
    assert_close(nf4_linear(x, w), ref.nf4_linear(x, w.dequantize(dtype)), scale=k**0.5 / 8)


def test_linear_cuda_bias_batch_shape_and_module():
    linear = torch.nn.Linear(512, 256).cuda().to(torch.bfloat16)
    q = NF4Linear.from_linear(linear)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)
    expected = ref.nf4_linear(x, q.weight.dequantize(torch.bfloat16), linear.bias)
    assert_close(q(x), expected, scale=4)
    cpu = NF4Linear.from_linear(linear.float().cpu()).cuda()
    assert cpu.weight.device.type == "cuda"


def test_linear_cuda_graph_capture(gemv_staging):
    w = NF4Weight.quantize(torch.randn(256, 512), 64, True).to("cuda")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    y_eager = nf4_linear(x, w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nf4_linear(x, w)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, nf4_linear(x, w))
    assert not torch.equal(y, y_eager)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 14336), (6144, 4096), (4100, 11008), (33, 96)])
def test_gemv_staged_equals_registers_bit_for_bit(shape, double_quant):
    """The GEMV's two main loops (set_nf4_gemv_staging) give the same outputs bit for bit: each warp meets the same
    steps in the same order, only where their loads wait differs."""
    from lorax_core._library import set_nf4_gemv_staging

    n, k = shape
    w = NF4Weight.quantize(torch.randn(n, k), 64, double_quant).to("cuda")
    was = set_nf4_gemv_staging(False)
    try:
        for m in range(1, NF4_GEMV_MAX_ROWS + 1):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            registers = nf4_linear(x, w)
            set_nf4_gemv_staging(True)
            staged = nf4_linear(x, w)
            set_nf4_gemv_staging(False)
            assert torch.equal(staged, registers), f"m = {m}"
    finally:
        set_nf4_gemv_staging(was)
