"""Build the compiled extension `lorax_core._C`.

A CUDA extension when the installed torch has CUDA and nvcc is found, otherwise a CPU-only C++ extension.
Build knobs (read here, nowhere else): CUDA_HOME, TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS,
LORAX_CPU_ONLY=1 (skip CUDA even when it is available).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"  # A100 (the LoRA Land report) and H100


def find_cuda_home():
    """The toolkit root: $CUDA_HOME, else the folder of a real nvcc (wrappers on PATH are resolved)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def wheel_cuda_include_dirs():
    """CUDA library headers shipped by torch's pip wheels (nvidia/cu13/include, ...): the toolkit may lack them."""
    import site

    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def extension():
    cuda_home = None if os.environ.get("LORAX_CPU_ONLY") == "1" else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cxx_flags = ["-O3", "-ffp-contract=off"]  # the C++ standard is chosen by torch (C++20 for torch >= 2.12)
    define_macros = []
    if not with_cuda:
        sources = [s for s in sources if not s.endswith("_cuda.cpp")]
        return cpp_extension.CppExtension(
            "lorax_core._C", sources, extra_compile_args={"cxx": cxx_flags}, include_dirs=[os.path.join(ROOT, "csrc")]
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)  # unset, torch probes a GPU and fails without one
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    define_macros.append(("LORAX_WITH_CUDA", "1"))
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-Xptxas=-warn-spills",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    include_dirs = [os.path.join(ROOT, "csrc")] + wheel_cuda_include_dirs()
    return cpp_extension.CUDAExtension(
        "lorax_core._C",
        sources,
        define_macros=define_macros,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})
