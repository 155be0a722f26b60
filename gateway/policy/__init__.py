"""The policy: its schema, loading, compiling into the runtime Policy, the live store."""
