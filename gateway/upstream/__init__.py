"""The pooled upstream clients and what the gateway checks of and adds to an upstream call."""
