"""Engine layer: the synchronous engine core, its asyncio facade and the offline LLM API."""
