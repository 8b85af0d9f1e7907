"""SENTINEL: failure-driven reinforcement learning of tool-using LLM agents."""

__version__ = "0.1.0"
