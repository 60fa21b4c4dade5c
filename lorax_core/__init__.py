"""lorax-core: a multi-LoRA inference engine and QLoRA trainer on a compiled PyTorch extension.

Importing the package loads the compiled ops (`torch.ops.lorax_core`); without them it fails and says how
to build them.
"""
from lorax_core import _library  # noqa: F401  (loads lorax_core._C and registers fake kernels)
from lorax_core import adapters, ops, quant
from lorax_core.engine import LLM, AsyncLLM, EngineConfig, RequestError, RequestOutput, SamplingParams, StreamDelta

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "RequestError", "RequestOutput", "SamplingParams", "StreamDelta", "adapters", "ops",
           "quant"]
__version__ = "0.1.0"
