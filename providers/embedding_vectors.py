"""Embeddings in the encoding the client asked for.

OpenAI answers `encoding_format: "base64"` with each vector as the base64 of its little-endian float32 bytes;
llama-cpp-python ignores the field and sends floats, which a client that asked for base64 (and decodes it
itself) cannot read. Such an answer is re-encoded; one that is already base64 is left as it is.
"""

from __future__ import annotations

import base64
import struct
from typing import Any


def as_requested_base64(payload: dict[str, Any]) -> bool:
    """Re-encode float vectors in an embeddings `payload` as base64, in place; True if any was."""
    changed = False
    for item in payload.get("data") or ():
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            item["embedding"] = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            changed = True
    return changed
