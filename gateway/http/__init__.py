"""The HTTP edge: the ASGI entry, connections, the gate before a body is read, and every route that is not an
inference front door."""
