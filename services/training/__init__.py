"""Training: run folders, the run manager and index, live watching, the trainer, its data and worker, preflight."""
