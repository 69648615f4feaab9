"""Inference: the Playground's model worker, its client, generation requests and saved chats."""
