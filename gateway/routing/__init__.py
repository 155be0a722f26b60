"""Choosing and calling a target: strategies, breakers, retries and fallbacks, health."""
