"""ForgeLLM application: the composition root, the CLI and the NiceGUI app."""
