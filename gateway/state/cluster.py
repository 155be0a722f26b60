"""Redis Cluster for the state store: each command goes to the master that owns its key's slot.

`ClusterClient` has `RespClient`'s surface (`call`, `call_within`, `abort`,
`close`), so `RedisStore` sends the same commands to either; the single-node
path never runs this module. Per node it keeps one pipelined `RespClient`.

- The slot map (slot -> master) comes from `CLUSTER SLOTS`, asked of any known
  node or seed; it is loaded on first use and reloaded after a `MOVED` (in the
  background: the redirected command itself follows the `MOVED` at once) and
  after a node refuses connections (a failover may have promoted its replica).
- A command is routed by its first key: every key of one store call shares the
  team's `{hash tag}`, hence one slot. `MGET` over several slots is split per
  slot and reassembled. Keyless commands (`TIME`) go to any reachable master.
- `ASK` (the slot is being migrated and the key is on the target): `ASKING` and
  the command on the target, on a connection reserved for that so that nothing
  runs between the two.
- `TRYAGAIN` (a multi-key call during a migration) and `CLUSTERDOWN` (no
  master for the slot yet): retried after a short pause, within the deadline.

Only replies that prove Redis did not run the command are retried: a
redirection, or a connection that could not be opened. A connection lost
after the command was written is the caller's to handle (the store journals
the call under its id and replays it; the script skips a call that ran).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import urlparse

from gateway.state.resp import ConnectionLost, RedisReplyError, RespClient

log = logging.getLogger("switchboard.state")

SLOTS = 16384
_MAX_HOPS = 8  # redirections and retries one command may take (a stable cluster needs at most two)
_RETRY_PAUSE_S = 0.01  # first pause after TRYAGAIN / CLUSTERDOWN; doubles up to the deadline
# Where each command the store sends has its first key; any other command is sent to any master.
_FIRST_KEY = {"EVALSHA": 3, "EVAL": 3, "MGET": 1, "GET": 1, "SET": 1, "INCRBY": 1, "DEL": 1}
_SLOT_CACHE_MAX = 65_536

Address = tuple[str, int]


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16 = _crc16_table()


def key_slot(key: str) -> int:
    """The key's cluster slot: CRC16/XMODEM of its first non-empty `{hash tag}` (or the whole key), mod 16384."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key.encode():
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc % SLOTS


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class ClusterClient:
    """The Redis Cluster that `seeds` (redis:// or rediss:// URLs of any of its nodes) belong to.

    Every node is reached with the first seed's scheme and credentials.
    """

    def __init__(self, seeds: Sequence[str], *, connect_timeout_s: float) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        first = urlparse(seeds[0])
        self._scheme = first.scheme
        self._credentials = first.netloc.rpartition("@")[0]
        self._seeds = [(urlparse(seed).hostname or "127.0.0.1", urlparse(seed).port or 6379) for seed in seeds]
        self._connect_timeout = connect_timeout_s
        self._owners: list[Address | None] = [None] * SLOTS
        self._masters: list[Address] = []  # the distinct owners in `_owners`
        self._replicas: set[Address] = set()
        self._nodes: dict[Address, RespClient] = {}
        # A second connection per node for ASK redirections: ASKING must be the command right before.
        self._asking: dict[Address, tuple[RespClient, asyncio.Lock]] = {}
        self._slots: dict[Any, int] = {}  # key -> slot
        self._loading: asyncio.Task[None] | None = None
        self._turn = 0  # where the next keyless command starts in the list of masters

    def call(self, *args: Any) -> Awaitable[Any]:
        """Send one command to the node that owns its key; await the result for its reply."""
        return self._send(None, args)

    def call_within(self, timeout_s: float, *args: Any) -> Awaitable[Any]:
        """`call`, redirections and retries included, given up after `timeout_s` (TimeoutError)."""
        return self._send(asyncio.get_running_loop().time() + timeout_s, args)

    def send_within(self, timeout_s: float, key: str, command: bytes) -> Awaitable[Any]:
        """A command already in RESP, to the node that owns `key` (its first key), given up after `timeout_s`."""
        return self._send_to_slot(asyncio.get_running_loop().time() + timeout_s, self._slot(key), command)

    def abort(self) -> None:
        """Reset every node's connections at once; waiting commands fail with `ConnectionLost`."""
        for client in self._clients():
            client.abort()

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        for client in self._clients():
            await client.close()

    def owner(self, key: str) -> Address | None:
        """The master this client believes owns `key`'s slot (None before the slot map is loaded)."""
        return self._owners[self._slot(key)]

    def _clients(self) -> list[RespClient]:
        return [*self._nodes.values(), *(client for client, _ in self._asking.values())]

    def _send(self, deadline: float | None, args: tuple[Any, ...]) -> Awaitable[Any]:
        command = args[0]
        if command == "MGET" and len(args) > 2:
            return self._mget(deadline, args[1:])
        first_key = _FIRST_KEY.get(command, 0)
        if first_key == 3 and not int(args[2]):
            first_key = 0  # a script without keys
        if not first_key:
            return self._keyless(deadline, args)
        return self._send_to_slot(deadline, self._slot(args[first_key]), args)

    async def _send_to_slot(self, deadline: float | None, slot: int, args: tuple[Any, ...] | bytes) -> Any:
        if self._owners[slot] is None:
            await self._load_slots(deadline)
        address, asking, pause = self._owners[slot], False, _RETRY_PAUSE_S
        for _ in range(_MAX_HOPS):
            if address is None:
                raise RedisReplyError(f"CLUSTERDOWN no node serves slot {slot}")
            try:
                if asking:
                    return await self._ask(address, deadline, args)
                return await _call(self._node(address), deadline, args)
            except RedisReplyError as exc:
                kind, _, where = str(exc).partition(" ")
                if kind == "MOVED":  # the slot has a new owner for good (a failover, a finished migration)
                    address, asking = _address(where.partition(" ")[2]), False
                    self._owners[slot] = address
                    self._reload_soon()
                elif kind == "ASK":  # this one key is already on the migration's target
                    address, asking = _address(where.partition(" ")[2]), True
                elif kind in ("TRYAGAIN", "CLUSTERDOWN"):
                    await _pause(deadline, pause)
                    address, asking, pause = self._owners[slot], False, pause * 2
                else:
                    raise
            except (ConnectionLost, TimeoutError):
                # Written, so it may have run: only its caller may send it again. A master that stopped
                # answering may have been replaced meanwhile (the cluster promotes its replica): reload the
                # map so that the caller's next try goes to whoever owns the slot now.
                self._reload_soon()
                raise
            except OSError:
                # Not connected, so not sent: a failover may have given the slot to another node.
                await self._load_slots(deadline)
                if self._owners[slot] == address:
                    raise
                address, asking = self._owners[slot], False
        raise RedisReplyError(f"slot {slot}: still redirected after {_MAX_HOPS} hops")

    async def _ask(self, address: Address, deadline: float | None, args: tuple[Any, ...] | bytes) -> Any:
        client, lock = self._asking.get(address) or self._asking.setdefault(
            address, (self._new_client(address), asyncio.Lock()))
        async with lock:  # nothing else on this connection between ASKING and the command
            await _call(client, deadline, ("ASKING",))
            return await _call(client, deadline, args)

    async def _keyless(self, deadline: float | None, args: tuple[Any, ...]) -> Any:
        if not self._masters:
            await self._load_slots(deadline)
        masters = self._masters
        # Each call starts at the next master, so one that hangs does not fail every keyless call (the
        # store's recovery probe is one).
        self._turn = (self._turn + 1) % max(len(masters), 1)
        failure: OSError | None = None
        for address in masters[self._turn:] + masters[:self._turn]:
            try:
                return await _call(self._node(address), deadline, args)
            except (ConnectionLost, TimeoutError):
                self._reload_soon()
                raise
            except OSError as exc:  # refused: try the next master
                failure = exc
        raise failure or ConnectionError("no Redis Cluster master is known")

    async def _mget(self, deadline: float | None, keys: Sequence[Any]) -> list[Any]:
        positions: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            positions.setdefault(self._slot(key), []).append(index)
        replies = await asyncio.gather(*(self._send_to_slot(deadline, slot, ("MGET", *(keys[i] for i in where)))
                                         for slot, where in positions.items()))
        values: list[Any] = [None] * len(keys)
        for where, reply in zip(positions.values(), replies, strict=True):
            for index, value in zip(where, reply, strict=True):
                values[index] = value
        return values

    def _slot(self, key: Any) -> int:
        # Cached by the whole key: a script's first key is the team's operation bitmap, the same for
        # 32,768 calls in a row (gateway/state/redis.py, EPOCH_OPS).
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= _SLOT_CACHE_MAX:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key.decode() if isinstance(key, bytes) else str(key))
        return slot

    def _node(self, address: Address) -> RespClient:
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = self._new_client(address)
        return client

    def _new_client(self, address: Address) -> RespClient:
        host, port = address
        host = f"[{host}]" if ":" in host else host
        credentials = self._credentials + "@" if self._credentials else ""
        return RespClient(f"{self._scheme}://{credentials}{host}:{port}/0", connect_timeout_s=self._connect_timeout)

    def _reload_soon(self) -> None:
        if self._loading is None or self._loading.done():
            self._loading = asyncio.get_running_loop().create_task(self._reload())
            self._loading.add_done_callback(_consume_failure)

    async def _load_slots(self, deadline: float | None) -> None:
        """Reload the slot map (one load at a time, shared by every caller), within the deadline."""
        self._reload_soon()
        assert self._loading is not None
        if deadline is None:
            await asyncio.shield(self._loading)
            return
        remaining = deadline - asyncio.get_running_loop().time()
        async with asyncio.timeout(max(remaining, 0)):
            await asyncio.shield(self._loading)

    async def _reload(self) -> None:
        candidates = list(dict.fromkeys([*self._masters, *self._replicas, *self._seeds]))
        failure: BaseException | None = None
        for address in candidates:
            try:
                reply = await self._node(address).call_within(self._connect_timeout, "CLUSTER", "SLOTS")
            except (RedisReplyError, OSError) as exc:
                failure = exc
                continue
            self._apply(reply, address)
            return
        raise ConnectionError(f"no Redis Cluster node answered CLUSTER SLOTS: {failure}")

    def _apply(self, reply: list[Any], answered_by: Address) -> None:
        owners: list[Address | None] = [None] * SLOTS
        replicas: set[Address] = set()
        for start, end, master, *copies in reply:
            address = _node_address(master, answered_by)
            owners[start:end + 1] = [address] * (end + 1 - start)
            replicas.update(_node_address(copy, answered_by) for copy in copies)
        if owners != self._owners:
            log.info("Redis Cluster slot map loaded from %s:%d: %d masters", *answered_by,
                     len(set(owners) - {None}))
        self._owners, self._replicas = owners, replicas
        self._masters = list(dict.fromkeys(owner for owner in owners if owner is not None))
        # Connections to nodes that left the map are closed; a node that comes back gets a new one.
        listed = set(owners) | replicas | set(self._seeds)
        for address in [address for address in self._nodes if address not in listed]:
            self._nodes.pop(address).abort()


def _node_address(entry: list[Any], answered_by: Address) -> Address:
    host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0] or "")
    # An empty host means "the address you reached me at" (a node that does not know its own IP).
    return (host or answered_by[0]), int(entry[1])


def _call(client: RespClient, deadline: float | None, args: tuple[Any, ...] | bytes) -> Awaitable[Any]:
    # Not a coroutine itself: one frame fewer per command on the admission path.
    if deadline is None:
        return client.call(*args)
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise TimeoutError("Redis Cluster: the deadline passed while following redirections")
    if isinstance(args, bytes):  # already in RESP (`send_within`)
        return client.send_within(remaining, "", args)
    return client.call_within(remaining, *args)


async def _pause(deadline: float | None, seconds: float) -> None:
    if deadline is not None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= seconds:
            raise TimeoutError("Redis Cluster: the slot stayed unavailable (TRYAGAIN / CLUSTERDOWN) until the deadline")
    await asyncio.sleep(seconds)


def _consume_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        task.exception()  # a failed background reload is retried by the next command that needs it
