"""lorax-train: QLoRA fine-tuning (PEFT + bitsandbytes) whose adapters lorax-core serves unchanged, and lorax-eval."""
from lorax_train.config import PRESETS, TrainConfig
from lorax_train.trainer import TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]
