"""The model shape the engine needs, read from a Hugging Face config (Llama, Mistral, Qwen2 families)."""
from __future__ import annotations

import dataclasses

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v biases (Qwen2)
    sliding_windows: tuple[int, ...] = ()  # per layer, 0 = full attention; empty = all full
    eos_token_ids: tuple[int, ...] = ()
    hf_config: object = dataclasses.field(default=None, repr=False)  # for RoPE parameters

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads")
        if not self.sliding_windows:
            self.sliding_windows = (0,) * self.num_layers

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """From a transformers `PretrainedConfig` (what `AutoConfig.from_pretrained` returns)."""
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {hf.model_type!r} is not supported; lorax-core serves "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported (Llama-family models use silu)")
        if getattr(hf, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        heads = hf.num_attention_heads
        return cls(
            model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", hf.model_type == "qwen2")),
            sliding_windows=_sliding_windows(hf), eos_token_ids=as_token_ids(hf.eos_token_id),
            hf_config=hf,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every projection a LoRA adapter may target, by PEFT module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * torch.empty(0, dtype=dtype).element_size()


def as_token_ids(value) -> tuple[int, ...]:
    """An `eos_token_id`-style field (None, one id or a list of ids) as a tuple of ids."""
    return (value,) if isinstance(value, int) else tuple(value or ())


def _sliding_windows(hf) -> tuple[int, ...]:
    window = getattr(hf, "sliding_window", None) or 0
    if getattr(hf, "use_sliding_window", True) is False:
        window = 0
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    return (window,) * hf.num_hidden_layers
