"""ForgeLLM services: framework-agnostic, thread-safe, no UI imports.

Importing this package loads a fast BLAS (Intel MKL, where installed) before anything imports MLX, so
every entry point (the app, the CLI, each worker) gets it without module-level preamble.
"""

from services.blas import preload as _preload_blas

__version__ = "0.1.0"

_preload_blas()
