"""Publishing: rules, jobs, fuse, parity, GGUF export, model card and the Hub upload."""
