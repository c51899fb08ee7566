"""The HTTP layer: OpenAI- and DeepSeek-compatible API over the engine's public interface."""
