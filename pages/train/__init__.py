"""The Train page: the run form, presets, the learning-rate preview and preflight."""
