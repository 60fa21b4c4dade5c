"""Console scripts: `lorax-train` (QLoRA fine-tuning, LoRA Land preset) and `lorax-eval` (base vs adapters per task)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lorax_train.config import PRESETS, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax-train", description="QLoRA fine-tuning (PEFT + bitsandbytes) whose "
                                     "output is a PEFT adapter directory that lorax-core serves unchanged. Settings: "
                                     "the preset, then --config (JSON), then these flags.")
    parser.add_argument("--preset", default="lora-land", choices=sorted(PRESETS))
    parser.add_argument("--config", help="JSON file of settings (field names as the flags, with underscores)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    helps = {"base": "Hugging Face model directory or hub id", "data": "JSONL training data",
             "out": "output adapter directory", "steps": "optimizer steps (lora-land: 40000)",
             "template": "prompt template, Python format fields from the record, e.g. 'Q: {prompt}\\nA:'",
             "target_modules": "comma-separated module names"}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "preset":
            continue
        kind = {"int": int, "float": float, "str": str, "str | None": str}.get(str(field.type))
        if field.type == "bool":
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=helps.get(field.name))
        elif field.name == "target_modules":
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                                help=helps[field.name])
        else:
            parser.add_argument(_flag(field.name), dest=field.name, type=kind, default=None, help=helps.get(field.name))
    return parser


def train_main(argv: list[str] | None = None) -> int:
    from lorax_train.trainer import train

    args = vars(train_parser().parse_args(argv))
    preset, config_file, no_resume = args.pop("preset"), args.pop("config"), args.pop("no_resume")
    try:
        config = TrainConfig.build(preset, config_file, **args)
        for name in ("base", "data", "out"):
            if not getattr(config, name):
                raise ValueError(f"{_flag(name)} is required (or set '{name}' in the --config file)")
        result = train(config, resume=not no_resume)
    except ValueError as err:
        print(f"lorax-train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"adapter": str(result.adapter_dir), "steps": result.steps, "last_loss": result.last_loss,
                      "val_loss": result.val_loss, "skipped": result.skipped, "truncated": result.truncated}))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    from lorax_train.evaluate import METRICS, evaluate

    parser = argparse.ArgumentParser(prog="lorax-eval", description="Score the base model and adapters on a JSONL "
                                     "test set through the lorax-core engine, one row per task.")
    parser.add_argument("--base", required=True, help="Hugging Face model directory or hub id")
    parser.add_argument("--data", required=True, help="JSONL test set (prompt / completion, optional task)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to score (repeat the flag for several)")
    parser.add_argument("--template", default="{prompt}")
    parser.add_argument("--metric", default="exact", choices=sorted(METRICS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantize", choices=["nf4"], help="serve the base in NF4 (as QLoRA trained it)")
    parser.add_argument("--device")
    parser.add_argument("--json", help="also write the scores and outputs to this file")
    args = parser.parse_args(argv)
    try:
        adapters = {}
        for item in args.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--adapter takes NAME=DIR, got {item!r}")
            adapters[name] = path
        result = evaluate(args.base, args.data, adapters, args.template, args.metric, args.max_tokens,
                          args.quantize, args.device)
    except ValueError as err:
        print(f"lorax-eval: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.metric} match, greedy, up to {args.max_tokens} tokens\n")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    return 0
