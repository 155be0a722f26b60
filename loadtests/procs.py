"""Child-process plumbing for bench.py: pinned launch, readiness polling, /proc CPU, guaranteed cleanup."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_children: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    """An ephemeral port the kernel considers free right now (tiny race until the child binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: int | None, argv: list[str]) -> list[str]:
    return argv if core is None else ["taskset", "-c", str(core), *argv]


class Child:
    """A pinned child in its own process group, with stdout/stderr captured to log files."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, core: int | None, cwd: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as log:
            # Own session: ctrl-c in the terminal reaches only us, and killpg takes workers down too.
            self.proc = subprocess.Popen(
                pinned(core, argv), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
        _children.append(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_http_ok(self, url: str, timeout: float = 30.0) -> None:
        """Poll url until it answers 200; fail fast (with the log tail) if the child dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    if proc in _children:
        _children.remove(proc)


def track(proc: subprocess.Popen[bytes]) -> None:
    """Register a child started elsewhere (the load generator) for cleanup."""
    _children.append(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        stop(proc)


def install_cleanup() -> None:
    """Kill every child on normal exit, exceptions, ctrl-c and SIGTERM."""
    atexit.register(stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces: split after its closing paren. Index 0 here is field 3 (state).
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """root and every live process below it (uvicorn --workers, taskset exec'd in place)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def cpu_seconds(root: int) -> float:
    """utime+stime of the live process tree under root, plus already-reaped children (cutime/cstime)."""
    ticks = 0
    for pid in descendants(root):
        if fields := _stat_fields(pid):
            # fields[11:15] = utime, stime, cutime, cstime (stat fields 14-17)
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


def _cpu_lines() -> dict[str, list[int]]:
    with open("/proc/stat") as stat:
        return {f[0]: [int(v) for v in f[1:9]] for f in map(str.split, stat) if f[0].startswith("cpu")}


def machine_busy_seconds() -> float:
    """user+nice+system CPU time of the whole machine (all cores), to expose unrelated load.

    irq/softirq are left out on purpose: loopback TCP work runs there and is not billed to any process,
    so counting it would make the benchmark's own traffic look like foreign load.
    """
    user, nice, system = _cpu_lines()["cpu"][:3]
    return (user + nice + system) / CLK_TCK


def core_busy_seconds(core: int) -> float:
    """All non-idle time of one core, kernel softirq included: is that core really saturated?"""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _cpu_lines()[f"cpu{core}"]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK
