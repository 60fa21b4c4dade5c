"""Shared test settings: seeds, tolerances, the CUDA skip mark and comparison helpers (defined once, here)."""
import re
from pathlib import Path

import pytest
import torch

import lorax_core  # noqa: F401  (loads the compiled ops)

SEED = 0
HAS_CUDA = torch.cuda.is_available()

# Tolerances of a result against its fp32 reference, per activation dtype.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(params=[False, True], ids=["registers", "staged"])
def gemv_staging(request):
    """Each of the NF4 GEMV's main loops on a GPU (lorax_core._library.set_nf4_gemv_staging): weights loaded into
    registers, or staged in shared memory. Their results are equal bit for bit, so the GEMV's tests run with both.
    (test_cuda_emulated.py overrides this fixture for the emulator's library.)"""
    from lorax_core._library import set_nf4_gemv_staging

    was = set_nf4_gemv_staging(request.param)
    yield request.param
    set_nf4_gemv_staging(was)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare in fp32 with the tolerance of `dtype` (default: actual's dtype), relative to `scale`."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def assert_rounds_exact(actual: torch.Tensor, exact: torch.Tensor, atol: float = 1e-4, magnitude=None):
    """`actual` (fp16 / bf16) is `exact` (fp32) rounded once: within half an ulp of actual's dtype, plus slack for the
    order of an fp32 sum: `atol`, or, given `magnitude` (each output's sum of |terms|), 2^-21 of it. Tensor cores
    accumulate in fp32 but align each group of products to the largest before adding, truncating the rest; over
    K = 14336 terms that cost 2^-24.6 of the magnitude on an H100 (2026-11-24), more than a fixed 1e-4. Rounding each
    product or each block's partial sum to 16 bits instead costs about 2^-12 / sqrt(K) of it in fp16 (2^-19 at
    K = 14336) and 2^-9 / sqrt(K) in bf16: outside."""
    half_ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[actual.dtype]
    slack = atol if magnitude is None else 2.0**-21 * magnitude
    error = (actual.float() - exact).abs()
    allowed = half_ulp * exact.abs() + slack
    bad = error > allowed
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs are not the exact value rounded once: at {i} "
                             f"{actual[i].item()} vs {exact[i].item()}, allowed {allowed[i]:.3g}")


def _gemv_max_rows() -> int:
    """kGemvMaxM of csrc/nf4/nf4_cuda.h, read from the source so a change there reaches the tests' expectations."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "nf4" / "nf4_cuda.h").read_text()
    return int(re.search(r"constexpr int64_t kGemvMaxM = (\d+);", header).group(1))


NF4_GEMV_MAX_ROWS = _gemv_max_rows()  # nf4_linear's GEMV on CUDA takes up to this many rows of x


def nf4_gemv_weight(w, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 weight that nf4_linear's one-row CUDA GEMV multiplies x (fp16 / bf16) by: each NF4 value rounded to
    x's dtype (its tensor cores' operand), times its block's fp32 absmax."""
    from lorax_core.ops import reference

    return reference.nf4_dequantize(w.codes, w.absmax_fp32(), w.blocksize, w.shape, torch.float32, values_dtype=dtype)


def assert_nf4_linear(y: torch.Tensor, x: torch.Tensor, w, bias: torch.Tensor | None = None):
    """A CUDA nf4_linear result (fp16 / bf16) against what its path computes: up to NF4_GEMV_MAX_ROWS rows of x, the
    GEMV's exact product with nf4_gemv_weight rounded once; more, the product with W rounded to x's dtype, within
    that dtype's tolerance. (Against the rounded W, the GEMV's outputs near zero can miss that tolerance.)"""
    k = x.shape[-1]
    if x.numel() // k <= NF4_GEMV_MAX_ROWS:
        exact = x.float() @ nf4_gemv_weight(w, x.dtype).T
        assert_rounds_exact(y, exact + bias.float() if bias is not None else exact)
    else:
        from lorax_core.ops import reference

        assert_close(y, reference.nf4_linear(x, w.dequantize(x.dtype), bias), scale=k**0.5 / 8)