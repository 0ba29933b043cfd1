"""asgi-llm."""
