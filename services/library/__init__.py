"""The library: models and datasets on disk, imports, GGUF, dataset checks, samples and the tiny test model."""
