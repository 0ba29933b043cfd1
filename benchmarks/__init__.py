"""asgi-llm benchmarks: `python -m benchmarks run | layers | streaming | memory | growth` (see README.md)."""
