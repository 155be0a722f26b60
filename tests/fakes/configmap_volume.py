"""A Kubernetes ConfigMap volume on disk, updated the way kubelet updates it.

kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) never rewrites a
projected file. Each version lives in a new hidden directory named after the
time (`..2026_12_03_16_10_00.123456789`); `..data` is a symlink to the current
one, and each visible file is a symlink through it (`policy.yaml ->
..data/policy.yaml`). An update writes the new directory, points a temporary
`..data_tmp` at it, renames that over `..data` (one atomic step) and then
deletes the old directory.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._versions = 0
        self.update(files)

    def path(self, name: str) -> Path:
        return self.root / name

    def update(self, files: dict[str, str], *, mtime_ns: int | None = None) -> None:
        """Publish a new version of every file; `mtime_ns` stamps the new files with a given time."""
        self._versions += 1
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        version = f"..{stamp}.{time.time_ns() % 10**9:09d}{self._versions}"
        directory = self.root / version
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)
            if mtime_ns is not None:
                os.utime(directory / name, ns=(mtime_ns, mtime_ns))
        data = self.root / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        os.symlink(version, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", data)
        for name in files:
            visible = self.root / name
            if not visible.is_symlink():
                os.symlink(f"..data/{name}", visible)
        if previous is not None:
            shutil.rmtree(self.root / previous)
