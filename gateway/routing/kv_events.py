"""vLLM KV-cache events: which prefix blocks each replica holds, for `kv-aware` routing's precise index.

A vLLM engine started with `--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'`
publishes on a ZMQ PUB socket. The wire format followed here is vLLM 0.11's
`vllm/distributed/kv_events.py` (also what its
`examples/online_serving/kv_events_subscriber.py` decodes):

- each message is three frames: topic, an 8-byte big-endian sequence number,
  and a msgpack payload;
- the payload is a `KVEventBatch` encoded by msgspec as an array
  `[ts, events]` (later versions append the data-parallel rank);
- each event is a tagged array: `["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium]`,
  `["BlockRemoved", block_hashes, medium]` or `["AllBlocksCleared"]`; trailing
  fields may be absent in older versions, and hashes are ints (before 0.11) or
  bytes;
- after a gap in sequence numbers, a request to the replay (ROUTER) socket
  carrying the first missing number as 8 big-endian bytes is answered with
  `[seq, payload]` messages up to an empty payload.

The engine's block hashes depend on its hash algorithm and seed (the default
`builtin` hash is salted per process unless PYTHONHASHSEED is set), so the index
does not recompute them: it keys each block by its own chain hash of the
block's token ids (sent with every `BlockStored`) and keeps the engine's hash
only to apply removals. A request is matched by tokenizing its prompt with the
provider's `kv_events.encoding`, cutting it into the engine's block size and
chaining the same hash: that matches the engine's blocks only when the gateway
tokenizes the prompt as the engine does (see policies/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import orjson
import tiktoken
import zmq
import zmq.asyncio

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy, Provider, Target
    from gateway.routing.strategies import RouteState

log = logging.getLogger("switchboard.kv_events")

_ROOT = b""
_REPLAY_TIMEOUT_S = 1.0


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The gateway's identity of a block: its parent's key and its token ids, hashed."""
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=16).digest()


def chain_keys(tokens: Sequence[int], block_size: int, parent: bytes = _ROOT) -> list[bytes]:
    """Keys of the full blocks of `tokens` (a partial last block is never cached by the engine)."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_key(parent, tokens[start:start + block_size])
        keys.append(parent)
    return keys


def render_prompt(body: Mapping[str, Any]) -> str:
    """The text tokenized for matching: a completions `prompt`, or chat messages' roles and contents in order."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if not isinstance(content, str):
            content = orjson.dumps(content).decode()
        parts.append(f"<|{message.get('role', '')}|>\n{content}\n")
    return "".join(parts)


def request_block_keys(body: Mapping[str, Any], block_size: int, encoding: str) -> list[bytes]:
    """The block keys of a request's prompt: token-id prompts as sent, text tokenized with `encoding`."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        tokens: Sequence[int] = prompt
    else:
        try:
            # tiktoken keeps loaded encodings itself; offline it reads TIKTOKEN_CACHE_DIR.
            tokens = tiktoken.get_encoding(encoding).encode_ordinary(render_prompt(body))
        except (ValueError, OSError) as error:
            log.warning("cannot tokenize with %s for KV block matching: %s", encoding, error)
            return []
    return chain_keys(tokens, block_size)


class ReplicaBlocks:
    """The prefix blocks one replica holds, kept from its KV-cache events."""

    __slots__ = ("_by_engine_hash", "_held", "block_size", "encoding", "gaps", "last_event_at", "stale_after_s")

    def __init__(self, encoding: str, stale_after_s: float) -> None:
        self.encoding = encoding
        self.stale_after_s = stale_after_s
        self.block_size = 16  # vLLM's default; replaced by the size each BlockStored carries
        self.last_event_at = -1.0
        self.gaps = 0
        self._by_engine_hash: dict[Any, bytes] = {}
        self._held: set[bytes] = set()

    def live(self, now: float) -> bool:
        return self.last_event_at >= 0 and now - self.last_event_at <= self.stale_after_s

    def __len__(self) -> int:
        return len(self._held)

    def matched(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt this replica holds."""
        held = self._held
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    def apply(self, payload: bytes, now: float) -> None:
        """Apply one msgpack `KVEventBatch`."""
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
            raise ValueError("not a KVEventBatch")
        for event in batch[1]:
            self._apply_event(event)
        self.last_event_at = now

    def _apply_event(self, event: Any) -> None:
        if not isinstance(event, list) or not event:
            return
        kind = event[0]
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            for engine_hash in event[1]:
                key = self._by_engine_hash.pop(_hashable(engine_hash), None)
                if key is not None:
                    self._held.discard(key)
        elif kind == "AllBlocksCleared":
            self._by_engine_hash.clear()
            self._held.clear()

    def _stored(self, event: list[Any]) -> None:
        hashes, parent_hash, tokens, block_size = event[1], event[2], event[3], event[4]
        lora_id = event[5] if len(event) > 5 else None
        if lora_id is not None:
            return  # a LoRA adapter's blocks: requests for the base model never share them
        self.block_size = block_size
        if parent_hash is None:
            parent = _ROOT
        else:
            known = self._by_engine_hash.get(_hashable(parent_hash))
            if known is None:
                return  # its parent was stored before we listened: the chain cannot be matched
            parent = known
        for index, engine_hash in enumerate(hashes):
            parent = block_key(parent, tokens[index * block_size:(index + 1) * block_size])
            self._by_engine_hash[_hashable(engine_hash)] = parent
            self._held.add(parent)


def _hashable(engine_hash: Any) -> Any:
    return tuple(engine_hash) if isinstance(engine_hash, list) else engine_hash


def replica_blocks(states: RouteState, target: Target) -> ReplicaBlocks | None:
    """The event-fed block list of a target's replica, if its provider publishes KV events."""
    found = states.tables.get(_table_key(target.provider))
    return found if isinstance(found, ReplicaBlocks) else None


def _table_key(provider: Provider) -> tuple[str, ...]:
    return ("kv-blocks", provider.name, provider.settings.base_url)


class KVEventSubscriber:
    """One background task per provider with `kv_events`: subscribe, apply batches, replay after gaps."""

    def __init__(self, states: RouteState, policy: Callable[[], Policy]) -> None:
        self._states = states
        self._policy = policy
        self._context: zmq.asyncio.Context | None = None
        self._tasks: dict[tuple[Any, ...], asyncio.Task[None]] = {}

    def apply(self, providers: Iterable[Provider]) -> None:
        """Subscribe to newly configured publishers and drop those no longer wanted."""
        wanted = {(p.name, p.settings.base_url, p.kv_events): p for p in providers if p.kv_events is not None}
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
        for key, provider in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = asyncio.create_task(self._listen(provider))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def _zmq(self) -> zmq.asyncio.Context:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        return self._context

    async def _listen(self, provider: Provider) -> None:
        config = provider.kv_events
        assert config is not None
        blocks = ReplicaBlocks(config.encoding, config.stale_after_s)
        self._states.tables[_table_key(provider)] = blocks
        socket = self._zmq().socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, config.topic.encode())
        socket.connect(config.endpoint)
        last_seq = -1
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq > last_seq + 1:
                    # A gap, or batches published before this subscription took (ZMQ drops those): the
                    # engine keeps recent batches for replay.
                    blocks.gaps += last_seq >= 0
                    if config.replay_endpoint is not None:
                        last_seq = await self._replay(config.replay_endpoint, last_seq + 1, seq, blocks)
                if seq <= last_seq:
                    continue
                try:
                    blocks.apply(frames[2], self._states.clock())
                except (ValueError, TypeError, IndexError, msgpack.UnpackException) as error:
                    log.warning("undecodable KV event batch from %s: %s", provider.name, error)
                last_seq = seq
        finally:
            socket.close(linger=0)

    async def _replay(self, endpoint: str, start: int, until: int, blocks: ReplicaBlocks) -> int:
        """Ask the replay socket for batches `start`..`until - 1`; the last sequence number applied."""
        # A DEALER speaking REQ's envelope (empty delimiter frame): the engine's ROUTER answers one request
        # with many messages, which a REQ socket would refuse to receive.
        socket = self._zmq().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        last = start - 1
        try:
            await socket.send_multipart([b"", start.to_bytes(8, "big", signed=True)])
            while True:
                async with asyncio.timeout(_REPLAY_TIMEOUT_S):
                    _, seq_bytes, payload = await socket.recv_multipart()
                if not payload:
                    break
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if start <= seq < until:
                    blocks.apply(payload, self._states.clock())
                    last = seq
        except (TimeoutError, ValueError, zmq.ZMQError, msgpack.UnpackException) as error:
            log.warning("KV event replay from %s failed: %s", endpoint, error)
        finally:
            socket.close(linger=0)
        return last
