"""The runtime policy: a validated document compiled, with every concern's part, into what the request
path reads; the live store that reloads it; the difference between two of them."""
