"""Shared test settings: seeds, tolerances, the CUDA skip mark and comparison helpers (defined once, here)."""
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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare in fp32 with the tolerance of `dtype` (default: actual's dtype), relative to `scale`."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def assert_rounds_exact(actual: torch.Tensor, exact: torch.Tensor, atol: float = 1e-4):
    """`actual` (fp16 / bf16) is `exact` (fp32) rounded once: within half an ulp of actual's dtype, plus `atol` for
    the order of an fp32 sum."""
    half_ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[actual.dtype]
    torch.testing.assert_close(actual.float(), exact, rtol=half_ulp, atol=atol)
