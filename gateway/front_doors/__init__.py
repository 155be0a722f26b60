"""Front doors: other client APIs served by translating to and from the chat pipeline.

Each module turns one foreign request shape into an OpenAI chat request, hands
it to `gateway.pipeline.handle_inference` (so auth, limits, routing, retries,
usage and cost work exactly as for /v1/chat/completions) and turns the reply,
stream or error back into the foreign shape.
"""
