"""Builds our CUDA kernels for the CPU emulator (cuda_emu.h) as the op library `torch.ops.lorax_emu`.

The sources of csrc/{lora,attention,layers,nf4} are copied and rewritten, never edited in place:
- each .cu file gets cuda_emu.h first and its `extern __shared__ T x[];` becomes a pointer to the launch's dynamic
  shared memory; kernels are launched with `lorax::launch` (csrc/common/launch.cuh), never `<<<>>>`, and the
  emulator's launch.cuh runs them;
- each *_cuda.cpp registers its kernels for the CPU under `lorax_emu` instead of for CUDA under `lorax_core`
  (ops.cpp's schemas are copied under that name), with stand-ins for the few ATen / c10 CUDA headers they use;
  where host code calls an op through the dispatcher, it calls the `lorax_emu` one;
- the headers with inline PTX are replaced by the emulator's: csrc/common/mma.cuh (the tensor-core mma) by
  mma.cuh, csrc/common/launch.cuh (programmatic dependent launch) by launch.cuh, csrc/common/lane_table.cuh
  (shared-memory loads by address) by lane_table.cuh, csrc/common/cluster.cuh (thread block clusters) by
  cluster.cuh, csrc/common/cp_async.cuh (asynchronous copies to shared memory) by cp_async.cuh.
So `torch.ops.lorax_emu.<op>(cpu tensors)` runs the same host code and kernels as `torch.ops.lorax_core.<op>`
on a GPU. hooks.cpp adds the emulator's own ops for the tests (`lorax_emu::late_write`).

With `asan=True` the library is built with AddressSanitizer and UndefinedBehaviorSanitizer; the process must then
have libasan preloaded (`asan_env()` gives the environment for a subprocess). Builds go to
~/.cache/lorax_core/<checkout>/ (or $LORAX_EMU_BUILD_DIR) and are reused while the sources stay the same.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
FAMILIES = ("lora", "attention", "layers", "nf4")
STAND_INS = {Path("common/mma.cuh"): HERE / "mma.cuh", Path("common/launch.cuh"): HERE / "launch.cuh",
             Path("common/lane_table.cuh"): HERE / "lane_table.cuh", Path("common/cluster.cuh"): HERE / "cluster.cuh",
             Path("common/cp_async.cuh"): HERE / "cp_async.cuh"}


def cuda_include_dirs() -> list[str]:
    """Folders with cuda_runtime_api.h and cuda_bf16.h: the toolkit's, or those of torch's nvidia wheels."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [os.path.join(h, "include") for h in homes if h]
    for sp in sys.path:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    found = [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))]
    return (found[:1] + [d for d in dirs if os.path.isdir(d) and d not in found[:1]]) if found else []


EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite_kernels(text: str, name: str) -> str:
    if "<<<" in text:
        raise ValueError(f"{name}: launch kernels with lorax::launch (csrc/common/launch.cuh), not <<<>>>: "
                         "it adds programmatic dependent launch, and the emulator runs it")
    text = EXTERN_SHARED.sub(r"\1* const \2 = ::emu::dynamic_shared<\1>();", text)
    return '#include "cuda_emu.h"\n' + text


def rewrite_host(text: str) -> str:
    text = text.replace("TORCH_LIBRARY_IMPL(lorax_core, CUDA,", "TORCH_LIBRARY_IMPL(lorax_emu, CPU,")
    return dispatch_to_emulator(text.replace(".is_cuda()", ".is_cpu()"))


def dispatch_to_emulator(text: str) -> str:
    """Ops that call ops through the dispatcher ("lorax_core::sgmv") call the emulated ones."""
    return text.replace('"lorax_core::', '"lorax_emu::')


def _write(path: Path, text: str) -> None:
    """Writes only a changed file, so that ninja recompiles only what changed."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _rewritten(path: Path) -> tuple[Path, str] | None:
    """Where a file of csrc goes in the copy, and its text; None for files the emulator does not compile."""
    rel, text = path.relative_to(CSRC), path.read_text()
    if rel in STAND_INS:
        return rel, STAND_INS[rel].read_text()
    if path.suffix in (".h", ".cuh"):
        return rel, text
    if rel == Path("ops.cpp"):
        return rel, text.replace("TORCH_LIBRARY(lorax_core,", "TORCH_LIBRARY(lorax_emu,")
    if path.parent.name not in FAMILIES:
        return None
    if path.suffix == ".cu":
        return rel.with_suffix(".emu.cpp"), rewrite_kernels(text, str(rel))
    if path.name.endswith("_cuda.cpp"):
        return rel, rewrite_host(text)
    if path.name.endswith("_common.cpp"):
        return rel, dispatch_to_emulator(text)
    return None  # the CPU kernels


def sources(build_dir: Path) -> list[str]:
    """Writes the rewritten copy of csrc under build_dir; returns the files to compile."""
    files = []
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and (rewritten := _rewritten(path)) is not None:
            out = build_dir / "csrc" / rewritten[0]
            _write(out, rewritten[1])
            if out.suffix == ".cpp":
                files.append(str(out))
    return files


def load(asan: bool = False, verbose: bool = False):
    """Builds (or reuses) the emulated library and loads it; `torch.ops.lorax_emu` then has its ops."""
    from torch.utils import cpp_extension

    name = "lorax_emu_asan" if asan else "lorax_emu"
    # one build folder per checkout, so that two clones never rewrite each other's copies
    checkout = hashlib.sha1(str(CSRC).encode()).hexdigest()[:10]
    build_dir = Path(os.environ.get("LORAX_EMU_BUILD_DIR", Path.home() / ".cache" / "lorax_core")) / checkout / name
    build_dir.mkdir(parents=True, exist_ok=True)
    files = [*sources(build_dir / "src"), str(HERE / "hooks.cpp")]
    flags = ["-O1", "-g", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-DLORAX_EMULATOR"]
    ldflags = []
    if asan:
        # and UndefinedBehaviorSanitizer: misaligned vector loads (a GPU faults on them), integer overflow, ...
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
        flags += [*sanitize, "-fno-omit-frame-pointer"]
        ldflags += sanitize
    return cpp_extension.load(
        name=name,
        sources=files,
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(HERE / "include"), str(HERE), str(build_dir / "src" / "csrc"), *cuda_include_dirs()],
        build_directory=str(build_dir),
        verbose=verbose,
    )


def asan_env() -> dict[str, str] | None:
    """The environment for a Python process that loads the ASan build, or None without gcc's libasan."""
    try:
        libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                               check=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    except (OSError, subprocess.CalledProcessError):
        return None
    if not all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs):
        return None
    env = dict(os.environ)
    # libstdc++ is preloaded too: ASan's __cxa_throw interceptor needs it loaded before torch's libraries
    env["LD_PRELOAD"] = " ".join(libs)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    return env
