"""The `switchboard` command."""
