"""Switchboard: an OpenAI-compatible LLM gateway."""
