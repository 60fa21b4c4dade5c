"""Llama-family models (Llama, Mistral, Qwen2) built from Hugging Face checkpoints."""
from lorax_core.model.config import ModelConfig
from lorax_core.model.llama import CausalLM
from lorax_core.model.loader import load_model, read_config, resolve_model_dir

__all__ = ["CausalLM", "ModelConfig", "load_model", "read_config", "resolve_model_dir"]
