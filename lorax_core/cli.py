"""`lorax-core` command line. Until the LoRA Land demo lands, `nf4-example` is the main job: it quantizes a
Mistral-7B-shaped projection to NF4, runs it, and reports memory, error and speed against the full-precision layer.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _time_ms(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def nf4_example(args: argparse.Namespace) -> int:
    from lorax_core.quant import NF4Linear

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    linear = torch.nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype)
    quantized = NF4Linear.from_linear(linear, blocksize=args.blocksize, double_quant=True)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype)

    with torch.no_grad():
        y_full, y_nf4 = linear(x).float(), quantized(x).float()
    rel_err = ((y_nf4 - y_full).norm() / y_full.norm()).item()
    full_bytes = linear.weight.numel() * linear.weight.element_size()
    nf4_bytes = quantized.weight.nbytes
    with torch.no_grad():
        ms_full = _time_ms(lambda: linear(x), device)
        ms_nf4 = _time_ms(lambda: quantized(x), device)

    print(f"NF4 example on {device} ({dtype}): y = x @ W.T, W [{args.out_features}, {args.in_features}], "
          f"x [{args.tokens}, {args.in_features}]")
    print(f"  weight bytes   {full_bytes / 2**20:8.2f} MiB -> {nf4_bytes / 2**20:8.2f} MiB NF4 "
          f"({full_bytes / nf4_bytes:.1f}x smaller, blocksize {args.blocksize}, double quant)")
    print(f"  relative error ||y_nf4 - y|| / ||y|| = {rel_err:.4f}  (NF4 of Gaussian weights: about 0.1)")
    print(f"  time per call  {ms_full:8.3f} ms full precision, {ms_nf4:8.3f} ms NF4 (wall clock, not a benchmark)")
    return 0 if rel_err < 0.2 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorax-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("nf4-example", help="quantize a layer to NF4 and run it")
    ex.add_argument("--in-features", type=int, default=4096)
    ex.add_argument("--out-features", type=int, default=4096)
    ex.add_argument("--tokens", type=int, default=16)
    ex.add_argument("--blocksize", type=int, default=64)
    ex.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(run=nf4_example)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
