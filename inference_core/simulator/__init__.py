"""A fast, deterministic stand-in for a vLLM (>= 0.12) server or the OpenAI API, with faults on demand."""

from inference_core.simulator.app import SimulatorConfig, create_simulator

__all__ = ["SimulatorConfig", "create_simulator"]
