"""`lorax-core` command line. `demo` is the main job: LoRA Land in miniature (train an adapter per synthetic task,
score base vs adapters, serve them all from one engine). `serve` runs the OpenAI-compatible HTTP server with every
adapter as a model. `nf4-example` quantizes a Mistral-7B-shaped projection to
NF4, runs it, and reports memory, error and speed against the full-precision layer.
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


def demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorax_core.demo import DemoSettings, run

    settings = DemoSettings(out=Path(args.out), base=args.base, device=args.device, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, n_train=args.n_train, n_test=args.n_test,
                            seed=args.seed, quantize=None if args.quantize == "none" else args.quantize)
    results = run(settings)
    print(f"results: {settings.out / 'results.json'}")
    return 0 if results["summary"]["goal_met"] else 1


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"an adapter is NAME=PATH (a PEFT directory or hub id), got {text!r}")
    return name, path


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lorax_core import LLM, AsyncLLM
    from lorax_core.server import create_app
    from lorax_core.server.scores import read_scores

    try:
        scores = read_scores(args.scores) if args.scores else None
    except ValueError as err:
        print(f"lorax-core serve: error: {err}", file=sys.stderr)
        return 2
    options = {"max_num_seqs": args.max_num_seqs} | ({"max_model_len": args.max_model_len} if args.max_model_len else {})
    llm = LLM(args.model, dtype=args.dtype, quantize=None if args.quantize == "none" else args.quantize,
              device=args.device, **options)
    for name, path in args.adapter:
        llm.load_adapter(name, path)
    name = args.served_model_name or args.model
    print(f"serving {name} ({llm.device}, {llm.dtype}) with adapters {[n for n, _ in args.adapter] or 'none'} on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    engine = AsyncLLM(llm)
    try:
        uvicorn.run(create_app(engine, name, args.api_key, scores), host=args.host, port=args.port,
                    log_level=args.log_level)
    finally:
        engine.close()
        llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from lorax_core.demo import DemoSettings as D  # its defaults are the demo flags' defaults

    parser = argparse.ArgumentParser(prog="lorax-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA Land in miniature: train, score and serve an adapter per task",
                       description="Build a small base model (or take --base), train one QLoRA adapter per synthetic "
                                   "task (sentiment, extraction, translation, addition), score the base and each "
                                   "adapter on held-out test sets, and serve every adapter from one engine in mixed "
                                   "batches. Writes OUT/results.json; exits 1 when the adapters miss the goal (mean "
                                   "lift >= 34 points, each adapter above the base).")
    d.add_argument("--out", default="lorax-demo", help="output directory (default: ./lorax-demo)")
    d.add_argument("--base", help="a Hugging Face model directory or hub id instead of the built small base")
    d.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    d.add_argument("--steps", type=int, default=D.steps, help="optimizer steps per adapter")
    d.add_argument("--batch-size", type=int, default=D.batch_size)
    d.add_argument("--lr", type=float, default=D.lr)
    d.add_argument("--n-train", type=int, default=D.n_train, help="training records per task")
    d.add_argument("--n-test", type=int, default=D.n_test, help="held-out test records per task")
    d.add_argument("--quantize", choices=["nf4", "none"], default=D.quantize, help="how the engine serves the base")
    d.add_argument("--seed", type=int, default=D.seed)
    d.set_defaults(run=demo)
    sv = sub.add_parser("serve", help="the OpenAI-compatible HTTP server: every adapter is a model",
                        description="Serve a base model and its LoRA adapters over HTTP with OpenAI's API "
                                    "(/v1/completions, /v1/chat/completions, /v1/models), plus /v1/load_lora_adapter, "
                                    "/v1/unload_lora_adapter, /health and /metrics, and the LoRA Land page at /. A request's `model` names an "
                                    "adapter, or the base model (--served-model-name, default: --model) for none.")
    sv.add_argument("--model", required=True, help="a Hugging Face model directory or hub id")
    sv.add_argument("--quantize", choices=["nf4", "none"], default="none", help="base weights (default: none)")
    sv.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=PATH",
                    help="a PEFT LoRA adapter served as model NAME (repeat for more)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    sv.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and /metrics")
    sv.add_argument("--scores", help="evaluation results for the LoRA Land page at /: the demo's results.json or a "
                                     "lorax-eval --json file")
    sv.add_argument("--served-model-name", help="the base model's name in requests (default: --model)")
    sv.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together at most")
    sv.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(run=serve)
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
