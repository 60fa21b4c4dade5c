"""Training settings: the `lora-land` preset (the LoRA Land report's recipe), overridable by a JSON config file and
then by command-line flags."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LoRA Land (Predibase, arXiv 2405.00732, section 3): 4-bit NF4 base with double quantization, rank 8 on every
# projection, batch size 1, cosine schedule, gradient checkpointing, learning rate 0.002, 40,000 steps. Alpha 16
# and dropout 0.05 are Ludwig's LoRA defaults, which the report's runs used.
PRESETS: dict[str, dict] = {
    "lora-land": dict(rank=8, alpha=16.0, dropout=0.05, target_modules=ALL_PROJECTIONS, lr=2e-3, steps=40_000,
                      batch_size=1, grad_accum=1, warmup_ratio=0.03, load_in_4bit=True, gradient_checkpointing=True),
}


@dataclasses.dataclass
class TrainConfig:
    base: str = ""  # Hugging Face model directory or hub id
    data: str = ""  # JSONL: {"prompt", "completion"} or {"messages"} per line
    out: str = ""  # the adapter directory (checkpoints go to out/checkpoints)
    preset: str = "lora-land"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(ALL_PROJECTIONS))
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    warmup_ratio: float = 0.03
    steps: int = 40_000  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 2048  # tokens of prompt + completion; longer prompts are skipped, long completions cut
    seed: int = 42
    load_in_4bit: bool = True  # NF4 base with double quantization (bitsandbytes)
    gradient_checkpointing: bool = True
    template: str = "{prompt}"  # the prompt as the model sees it: Python format fields from the record
    val_fraction: float = 0.0
    eval_every: int = 0  # steps between validation losses (0: only at the end, when there is a split)
    save_every: int = 1000  # steps between resumable checkpoints (0: none)
    keep_checkpoints: int = 2
    device: str | None = None  # default: cuda when present

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (bool(self.target_modules), "target_modules must name at least one module"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def build(cls, preset: str = "lora-land", config_file: str | Path | None = None, **overrides) -> "TrainConfig":
        """The preset's values, then the config file's, then the overrides (None values are ignored)."""
        values = dict(PRESETS.get(preset, {}), preset=preset)
        if config_file:
            try:
                values.update(json.loads(Path(config_file).read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"config file {config_file}: {err}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)
