"""The serving engine: sequences, scheduler, model runner, sampler and the LLM API."""
from lorax_core.engine.async_llm import AsyncLLM
from lorax_core.engine.config import EngineConfig
from lorax_core.engine.llm import LLM
from lorax_core.engine.outputs import RequestError, RequestOutput, StreamDelta
from lorax_core.engine.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "RequestError", "RequestOutput", "SamplingParams", "StreamDelta"]
