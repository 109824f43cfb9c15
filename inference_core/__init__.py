"""inference-core: one OpenAI-compatible endpoint in front of vLLM servers and the OpenAI API."""

__version__ = "0.1.0"
