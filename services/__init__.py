"""ForgeLLM services: framework-agnostic, thread-safe, no UI imports."""

__version__ = "0.1.0"
