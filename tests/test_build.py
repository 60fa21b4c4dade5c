"""The package loads its compiled ops, and says how to build them when it cannot."""
import subprocess
import sys
import textwrap

import torch

import lorax_core
from lorax_core import _library

OPS = ["nf4_quantize", "nf4_quantize_absmax", "nf4_dequantize_absmax", "nf4_dequantize", "nf4_linear",
       "sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand", "sgmv", "bgmv", "kv_cache_write",
       "paged_attention_decode", "rms_norm", "add_rms_norm", "rotary_embedding", "rotary_kv_cache_write",
       "silu_mul", "nf4_linear_sgmv", "nf4_linear_sgmv_rotary", "nf4_linear_sgmv_silu_shrink",
       "add_rms_norm_sgmv_shrink", "paged_attention_decode_sgmv_shrink"]


def test_ops_have_cpu_kernels():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lorax_core::{op}", "CPU"), op


def test_cuda_kernels_registered_when_built_with_cuda():
    if not _library.built_with_cuda():
        assert not _library.has_cuda_kernel("nf4_linear")
        return
    for op in OPS:
        assert _library.has_cuda_kernel(op), op


def test_programmatic_launch_switch():
    """On by default where the kernels are built (each launch then asks whether the GPU and CUDA support it);
    a CPU-only build has nothing to switch and always answers False."""
    first = _library.set_programmatic_launch(False)
    try:
        assert first is _library.built_with_cuda()
        assert _library.set_programmatic_launch(True) is False
        assert _library.set_programmatic_launch(True) is _library.built_with_cuda()
    finally:
        _library.set_programmatic_launch(first)


def test_import_without_extension_says_how_to_build():
    hide_ext = textwrap.dedent(
        """
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "lorax_core._C":
                    raise ImportError("simulated: no compiled extension")
        sys.meta_path.insert(0, Hide())
        import lorax_core
        """
    )
    proc = subprocess.run([sys.executable, "-c", hide_ext], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation -e ." in proc.stderr
    assert "simulated: no compiled extension" in proc.stderr


def test_version():
    assert lorax_core.__version__
