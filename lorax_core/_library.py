"""Load the compiled extension once; fail with a message that says how to build it."""
import torch

BUILD_HINT = (
    "lorax_core._C, the compiled extension, is not built or does not load. Build it from the repository root "
    "with `pip install --no-build-isolation -e .` (needs Python 3.11+, torch and a C++ compiler; nvcc and a "
    "CUDA build of torch for the GPU kernels)."
)

try:
    from lorax_core import _C
except ImportError as err:  # the message is the whole point of this module
    raise ImportError(f"{BUILD_HINT}\nCause: {err}") from err

from lorax_core.ops import _fake  # noqa: E402,F401  (fake kernels for torch.compile / opcheck)


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into the extension."""
    return bool(_C.built_with_cuda())


def has_cuda_kernel(op: str) -> bool:
    """True when `torch.ops.lorax_core.<op>` has a CUDA kernel registered."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lorax_core::{op}", "CUDA")


def set_programmatic_launch(enabled: bool) -> bool:
    """Turn programmatic dependent launch of our CUDA kernels on or off for later launches; returns the previous
    setting. On by default, used on GPUs of compute capability 9.0+ with CUDA 12.4+ (csrc/common/launch.cuh):
    each kernel launches while the one before it finishes. CUDA graphs keep what they captured. For A/B
    measurements (bench/bench_engine.py and bench/test_bench_lora.py time both) and as a way out should a driver
    mishandle it."""
    return bool(_C.set_programmatic_launch(enabled))


def set_nf4_gemv_staging(staged: bool) -> bool:
    """The NF4 GEMV's main loop (batch 1 to 8 decode) for later launches; returns the previous setting. False, the
    default: each warp loads its next steps' weights into registers. True: the CTA copies them (cp.async) into
    shared memory two or three 1024-element stages ahead (csrc/nf4/nf4_kernels.cu). Both give the same results
    bit for bit; bench/test_bench_nf4.py and bench/bench_engine.py time both. CUDA graphs keep what they captured."""
    return bool(_C.set_nf4_gemv_staging(staged))
