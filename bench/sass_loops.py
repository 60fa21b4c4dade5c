"""The loops of a compiled kernel in SASS, counted: a way to weigh a kernel change on a machine without a GPU.

    nvcc -std=c++17 -arch=sm_90 -Icsrc -cubin -o /tmp/nf4.cubin csrc/nf4/nf4_kernels.cu
    python bench/sass_loops.py /tmp/nf4.cubin gemv_kernelI13__nv_bfloat16Lb0ELb1

For each function whose mangled name contains the pattern, every loop (a backward branch) with the instructions of
its body, static: how many in all, tensor-core mmas (HMMA), shared-memory loads (LDS), global loads (LDG) and local
memory traffic (LDL / STL: register spills). A body's count includes its branches not taken, so subtract the code
that runs rarely (a tile change) before dividing by the bytes one pass handles. cuobjdump and nvdisasm come with
the CUDA toolkit, or from pip (`nvidia-cuda-cuobjdump`, `nvidia-cuda-nvdisasm`): set CUOBJDUMP to the binary if it
is not on PATH, and put nvdisasm on PATH.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
FUNCTION = re.compile(r"Function : (\S+)")
BRANCH = re.compile(r"\bBRA\s+(?:\S+,\s*)?(0x[0-9a-f]+)")


def functions(sass: str) -> dict[str, list[tuple[int, str, str]]]:
    """Mangled name -> [(address, opcode, operands)]."""
    out, current = {}, None
    for line in sass.splitlines():
        m = FUNCTION.search(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = INSTRUCTION.search(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def count(body: list[str], *names: str) -> int:
    """Instructions of body whose opcode is one of names (with any .modifiers)."""
    return sum(any(o == n or o.startswith(n + ".") for n in names) for o in body)


def loops(code: list[tuple[int, str, str]]) -> list[dict]:
    """Every backward branch's body, smallest first."""
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    found = []
    for i, (addr, op, operands) in enumerate(code):
        m = BRANCH.search(op + operands) if op.startswith("BRA") else None
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        body = [o for _, o, _ in code[index[int(m.group(1), 16)]:i + 1]]
        found.append({"start": hex(int(m.group(1), 16)), "end": hex(addr), "instructions": len(body),
                      "HMMA": count(body, "HMMA"), "LDS": count(body, "LDS"), "LDG": count(body, "LDG"),
                      "spills": count(body, "LDL", "STL")})
    return sorted(found, key=lambda d: d["instructions"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("pattern", help="a substring of the mangled function name")
    args = ap.parse_args(argv)
    tool = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if tool is None:
        sys.exit("cuobjdump not found: set CUOBJDUMP (pip download nvidia-cuda-cuobjdump, or the CUDA toolkit's)")
    sass = subprocess.run([tool, "-sass", args.cubin], capture_output=True, text=True, check=True).stdout
    matched = {name: code for name, code in functions(sass).items() if args.pattern in name}
    if not matched:
        sys.exit(f"no function in {args.cubin} matches {args.pattern!r} (is nvdisasm on PATH?)")
    for name, code in matched.items():
        print(f"{name}: {len(code)} instructions")
        for loop in loops(code):
            print("  loop {start}..{end}: {instructions} instructions, HMMA {HMMA}, LDS {LDS}, LDG {LDG}, "
                  "LDL/STL {spills}".format(**loop))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
