"""Build a CausalLM from a Hugging Face model directory (or hub id): config.json + safetensors, one file or
sharded; weights in fp32 / fp16 / bf16, quantized to NF4 at load time, or a bitsandbytes 4-bit checkpoint.

Hugging Face parameter names are mapped to ours in one place, `_build_layer`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lorax_core.model.attention import Attention
from lorax_core.model.config import ModelConfig
from lorax_core.model.layers import RMSNorm, RotaryEmbedding
from lorax_core.model.llama import MLP, CausalLM, DecoderLayer
from lorax_core.quant.nf4 import _QUANT_STATE_KEY, NF4Linear, NF4Weight

QUANTIZE_CHOICES = (None, "nf4")
# Fused NF4 projections (q | k | v, gate | up) keep their parts' double-quantized absmax, each part with its offset
# (NF4Weight.cat): a byte an absmax value instead of four, 8% fewer bytes for their GEMVs to read. Read at load time;
# bench/bench_engine.py turns it off to time the fp32 absmax the fusions had before.
FUSED_NF4_DOUBLE_QUANT = True


def resolve_model_dir(name_or_path: str | Path, what: str = "model") -> Path:
    """A local directory as is; anything else is a Hugging Face hub id, downloaded (or taken from the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ValueError(f"{what} {name!r}: no such directory (and not a hub id of the form 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown repo, gated, network: all end the same way for the user
        raise ValueError(f"{what} {name!r} is not a local directory and could not be fetched from the Hugging Face "
                         f"hub ({type(err).__name__}: {err}); download it while online (huggingface-cli download "
                         f"{name}) or pass a local directory") from None


class Checkpoint:
    """Lazy access to the tensors of every *.safetensors file of a directory (sharded or not)."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{directory} has no *.safetensors weights (lorax-core reads safetensors only; convert "
                             "a PyTorch .bin checkpoint with transformers' save_pretrained(safe_serialization=True))")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._where[key].get_tensor(key)
        except KeyError:
            raise ValueError(f"checkpoint is missing the tensor {key!r}") from None

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: self.get(k) for k in self.keys() if k.startswith(prefix)}


class Linear(nn.Module):
    """A frozen dense projection `y = x @ W.T (+ b)`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Builder:
    def __init__(self, ckpt: Checkpoint, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 quantize: str | None):
        self.ckpt, self.config, self.dtype, self.device = ckpt, config, dtype, device
        self.prequantized = any(k.endswith(_QUANT_STATE_KEY) for k in ckpt.keys())
        self.quantize = "nf4" if self.prequantized else quantize

    def tensor(self, key: str) -> torch.Tensor:
        return self.ckpt.get(key).to(self.device, self.dtype)

    def linear(self, prefixes: list[str], bias: bool = False) -> nn.Module:
        """One projection whose output rows are those of each checkpoint linear in `prefixes`, concatenated."""
        b = torch.cat([self.tensor(f"{p}.bias") for p in prefixes]) if bias else None
        if self.quantize is None:
            return Linear(torch.cat([self.tensor(f"{p}.weight") for p in prefixes]), b)
        if self.prequantized:
            parts = [NF4Weight.from_state_dict(self.ckpt.with_prefix(f"{p}."), "").to(self.device) for p in prefixes]
        else:
            parts = [NF4Weight.quantize(self.tensor(f"{p}.weight")) for p in prefixes]
        return NF4Linear(NF4Weight.cat(parts, keep_double_quant=FUSED_NF4_DOUBLE_QUANT), b)

    def layer(self, i: int, rotary: RotaryEmbedding) -> DecoderLayer:
        c, p = self.config, f"model.layers.{i}"
        qkv = self.linear([f"{p}.self_attn.{n}_proj" for n in "qkv"], bias=c.attention_bias)
        attn = Attention(c, i, qkv, self.linear([f"{p}.self_attn.o_proj"]), rotary)
        mlp = MLP(c, i, self.linear([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]), self.linear([f"{p}.mlp.down_proj"]))
        norms = [RMSNorm(self.tensor(f"{p}.{n}.weight"), c.rms_norm_eps)
                 for n in ("input_layernorm", "post_attention_layernorm")]
        return DecoderLayer(attn, mlp, *norms)


def read_config(model_dir: Path) -> ModelConfig:
    """The model's shape from its config.json (refusing unsupported architectures and quantizations)."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; it is not a Hugging Face model directory")
    hf = AutoConfig.from_pretrained(model_dir)
    _check_quantization_config(model_dir, getattr(hf, "quantization_config", None))
    return ModelConfig.from_hf(hf)


def load_model(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, quantize: str | None,
               max_positions: int) -> CausalLM:
    """The model in `model_dir` (see `resolve_model_dir`), on `device`, computing in `dtype`."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    build = _Builder(Checkpoint(model_dir), config, dtype, device, quantize)
    rotary = RotaryEmbedding(config.hf_config, config.head_dim, max_positions, device, dtype)
    layers = [build.layer(i, rotary) for i in range(config.num_layers)]
    embed = build.tensor("model.embed_tokens.weight")
    tied = config.tie_word_embeddings or "lm_head.weight" not in build.ckpt
    lm_head = embed if tied else build.tensor("lm_head.weight")
    return CausalLM(config, embed, layers, RMSNorm(build.tensor("model.norm.weight"), config.rms_norm_eps), lm_head)


def _check_quantization_config(model_dir: Path, quant) -> None:
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    if quant and not (quant.get("load_in_4bit") and quant.get("bnb_4bit_quant_type", "nf4") == "nf4"):
        raise ValueError(f"{model_dir}: quantization {quant.get('quant_method', quant)} is not supported; lorax-core "
                         "loads full-precision checkpoints or bitsandbytes NF4 4-bit ones")
