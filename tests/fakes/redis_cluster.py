"""A real Redis Cluster of our own: 3 masters and 3 replicas on free loopback ports, in a temporary directory.

Built the way an operator builds one (`redis-server --cluster-enabled yes` x6, then `redis-cli --cluster
create --cluster-replicas 1`), so slot ownership, MOVED/ASK and failover are Redis's own. The shared Redis
on 6379 is never touched; every process here is ours and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from tests.fakes.state_stores import free_port

NODE_TIMEOUT_MS = 1000  # how long a silent master takes to be declared failed (then its replica is promoted)


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `condition` (Redis offers no event for cluster state changes) until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if condition():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class RedisCluster:
    def __init__(self, workdir: Path, *, masters: int = 3, replicas_per_master: int = 1) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        count = masters * (1 + replicas_per_master)
        ports = _free_ports(2 * count)  # client ports and cluster-bus ports (explicit: port+10000 may be taken)
        self.ports, self._bus_ports = ports[:count], ports[count:]
        self._replicas_per_master = replicas_per_master
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RedisCluster:
        for port, bus in zip(self.ports, self._bus_ports, strict=True):
            self.start_node(port, bus)
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed"
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                        "--cluster-replicas", str(self._replicas_per_master), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self._settled, "the cluster to agree on every slot and every replica")
        return self

    def start_node(self, port: int, bus: int | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        bus = bus if bus is not None else self._bus_ports[self.ports.index(port)]
        self.processes[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-port", str(bus),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "no", "--save", "",
             "--repl-diskless-sync-delay", "0",  # replicas sync at once (the default waits 5 s for more)
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = self.processes[port]

        def answers() -> bool:
            assert process.poll() is None, f"redis-server on {port} exited with {process.returncode}"
            return bool(self.admin(port).ping())

        wait_until(answers, f"redis-server on {port}")

    def stop(self) -> None:
        for port in list(self.paused):
            self.resume(port)
        for process in self.processes.values():
            process.kill()
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()

    def pause(self, port: int) -> None:
        """SIGSTOP: the node keeps its connections open and answers nothing (a hung host, a partition)."""
        self.processes[port].send_signal(signal.SIGSTOP)
        self.paused.add(port)

    def resume(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)
        self.paused.discard(port)

    def kill_in_sync(self, master: int) -> None:
        """SIGKILL a master once its replicas hold every write it acknowledged.

        Redis replicates asynchronously: a master killed at random can take acknowledged writes with it
        (docs/operations.md says so). To test the gateway's own accounting through a failover, writes are
        paused (`CLIENT PAUSE WRITE`: commands in flight wait, then die with the master) until every replica
        has the master's replication offset; then the kill.
        """
        self.command(master, "CLIENT", "PAUSE", 10_000, "WRITE")
        self.wait_in_sync(master)
        self.kill(master)

    def wait_in_sync(self, master: int) -> None:
        """Wait until every replica of `master` holds the master's replication offset (replication is async)."""
        offset = self.admin(master).info("replication")["master_repl_offset"]
        replicas = self.replicas_of(master)
        wait_until(lambda: all(self.admin(replica).info("replication")["master_repl_offset"] >= offset
                               for replica in replicas), f"the replicas of {master} to catch up")

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.kill()
        process.wait(timeout=10)

    # -- what the cluster looks like ---------------------------------------------------------------

    @property
    def seeds(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}" for port in self.ports[:2]]

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def command(self, port: int, *args: Any) -> Any:
        client = self.admin(port)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def slot_of(self, key: str) -> int:
        return int(self.command(self.live_port(), "CLUSTER", "KEYSLOT", key))

    def live_port(self) -> int:
        return next(port for port in self.processes if port not in self.paused)

    def shards(self, port: int | None = None) -> list[tuple[int, list[tuple[int, int]]]]:
        """(master port, slot ranges) per shard, as node `port` sees them (CLUSTER SLOTS)."""
        found: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_ in self.command(port or self.live_port(), "CLUSTER", "SLOTS"):
            found.setdefault(int(master[1]), []).append((int(start), int(end)))
        return sorted(found.items())

    def masters(self) -> list[int]:
        return [master for master, _ in self.shards()]

    def master_of_slot(self, slot: int, port: int | None = None) -> int:
        for master, ranges in self.shards(port):
            if any(start <= slot <= end for start, end in ranges):
                return master
        raise AssertionError(f"no master serves slot {slot}")

    def master_of(self, key: str) -> int:
        return self.master_of_slot(self.slot_of(key))

    def replicas_of(self, master: int) -> list[int]:
        """The live replicas of `master` (CLUSTER NODES: CLUSTER SLOTS lists a replica only once gossip
        has carried its replication offset, seconds after it synced)."""
        master_id = self.node_id(master)
        replicas = []
        for line in self.command(self.live_port(), "CLUSTER", "NODES").decode().splitlines():
            _, address, flags, parent, *_ = line.split()
            if parent == master_id and "fail" not in flags.split(","):
                replicas.append(int(address.split("@")[0].rpartition(":")[2]))
        return sorted(replicas)

    def a_replica_of(self, master: int) -> int:
        """A live replica of `master`, waiting for CLUSTER NODES to list one (it can lag a fresh cluster's links:
        CI once saw none right after the cluster settled)."""
        wait_until(lambda: bool(self.replicas_of(master)), f"a replica of {master} in CLUSTER NODES")
        return self.replicas_of(master)[0]

    def node_id(self, port: int) -> str:
        reply = self.command(port, "CLUSTER", "MYID")
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _settled(self) -> bool:
        """Every live node reports cluster_state:ok and the same masters, and every replica is in sync."""
        views, in_sync = [], 0
        for port in self.processes:
            if b"cluster_state:ok" not in self.command(port, "CLUSTER", "INFO"):
                return False
            views.append(self.shards(port))
            replication = self.admin(port).info("replication")
            in_sync += replication["role"] == "slave" and replication.get("master_link_status") == "up"
        masters = len(self.ports) // (1 + self._replicas_per_master)
        return (all(view == views[0] for view in views) and len(views[0]) == masters
                and in_sync == len(self.ports) - masters)

    # -- changes an operator makes ----------------------------------------------------------------

    def failover(self, replica: int) -> None:
        """A manual failover (`CLUSTER FAILOVER` on the replica): it becomes its shard's master, no write lost."""
        self.command(replica, "CLUSTER", "FAILOVER")
        wait_until(lambda: all(replica in self.masters_seen_by(port) for port in self.processes),
                   f"replica {replica} to be master in every node's view")

    def masters_seen_by(self, port: int) -> list[int]:
        return [master for master, _ in self.shards(port)]

    def begin_migration(self, slot: int, source: int, target: int) -> None:
        """CLUSTER SETSLOT IMPORTING on the target, MIGRATING on the source (the first step of a reshard)."""
        self.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))

    def move_keys(self, slot: int, source: int, target: int) -> int:
        """MIGRATE every key of `slot` from `source` to `target`; returns how many moved."""
        moved = 0
        while keys := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        return moved

    def finish_migration(self, slot: int, target: int) -> None:
        """CLUSTER SETSLOT NODE on every master: the slot is the target's for good."""
        target_id = self.node_id(target)
        for port in self.masters():
            self.command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: all(self.master_of_slot(slot, port) == target for port in self.processes),
                   f"every node to see slot {slot} on {target}")


@contextlib.contextmanager
def redis_cluster(workdir: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(workdir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
