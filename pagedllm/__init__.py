"""pagedllm: serve large language models with PagedAttention."""

from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "BeamSearchParams"]
__version__ = "0.1.0"


def __getattr__(name):
    # LLM and the engine pull in torch; importing them lazily keeps
    # `import pagedllm` cheap for the plain-Python pieces (scheduler, KV cache).
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    if name == "LLMEngine":
        from pagedllm.engine.engine import LLMEngine

        return LLMEngine
    if name == "BeamSearchParams":
        from pagedllm.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "EngineConfig":
        from pagedllm.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
