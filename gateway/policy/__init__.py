"""The policy document: its schema, how a problem in it is pointed at, and the key files it names."""
