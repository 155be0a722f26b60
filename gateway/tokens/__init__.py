"""Token counting: prompts by endpoint family, chat framing rules, cut streams."""
