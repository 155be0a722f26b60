"""Traces, their export, and metrics."""
