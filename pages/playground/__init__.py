"""The Playground: chat, side-by-side compare with blind A/B rating, perplexity."""
