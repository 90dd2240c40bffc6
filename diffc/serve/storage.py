"""Output files in a server-owned directory: random ids, atomic writes, bounded retention.

Clients name outputs only by id; an id is looked up in memory and never turned into a path. At start
(``start()``) the outputs a previous server left in the directory (killed before it could delete them)
are indexed again, oldest first, so retention applies to them, and its half-written temporary files
are deleted; nothing else in the directory is touched. With a TTL, a timer deletes expired outputs
even when no request comes.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..fileio import atomic_write


OUTPUT_RE = re.compile(r"^(?:img|video)_[0-9a-f]{32}\.(?:png|jpeg|webp|mp4)$")
TEMP_RE = re.compile(r"^\.+(?:img|video)_[0-9a-f]{32}\.")  # atomic_write's temporary names for them


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class OutputStore:
    """Finished outputs, oldest first. Keeps at most ``keep`` of them and none older than ``ttl_s``.

    ``on_evict(id)`` is called (outside the lock) for every entry dropped by retention, so the engine
    can forget the job it belongs to.
    """

    def __init__(self, root: str | Path | None, keep: int = 100, ttl_s: float | None = None,
                 on_evict: Callable[[str], None] | None = None):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="diffc-serve-") if root is None else root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep, self.ttl_s, self.on_evict = keep, ttl_s, on_evict
        self._entries: collections.OrderedDict[str, tuple[Path | None, float]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def start(self) -> list[tuple[str, Path, float]]:
        """Index the outputs a previous server left here, delete its temporary files, apply retention, and start
        the TTL timer. Returns the outputs indexed again and kept: ``(id, path, time written)``, oldest first."""
        found = []
        for entry in os.scandir(self.root):
            if not entry.is_file(follow_symlinks=False):
                continue
            if OUTPUT_RE.match(entry.name):
                found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
            elif TEMP_RE.match(entry.name):
                Path(entry.path).unlink(missing_ok=True)
        restored = []
        with self._lock:
            for mtime, name in sorted(found):
                id_ = name.split(".", 1)[0]
                if id_ not in self._entries:
                    self._entries[id_] = (self.root / name, mtime)
                    restored.append(id_)
        self.prune()
        if self.ttl_s is not None and self._timer is None:
            self._timer = threading.Thread(target=self._expire, name="diffc-outputs-ttl", daemon=True)
            self._timer.start()
        with self._lock:
            return [(id_, *self._entries[id_]) for id_ in restored if id_ in self._entries]

    def _expire(self) -> None:
        interval = min(60.0, max(0.1, self.ttl_s / 4))
        while not self._stop.wait(interval):
            self.prune()

    def path_for(self, id_: str, suffix: str) -> Path:
        return self.root / f"{id_}{suffix}"

    def write(self, id_: str, suffix: str, write: Callable[[Path], None]) -> Path:
        """Write through a temporary file, then rename: a failure leaves nothing behind."""
        return atomic_write(self.path_for(id_, suffix), write)

    def add(self, id_: str, path: Path | None) -> None:
        """Record a finished output (``path`` may be ``None`` for a failed job) and apply retention."""
        with self._lock:
            self._entries[id_] = (path, time.time())
            self._entries.move_to_end(id_)
        self.prune()

    def get(self, id_: str) -> Path | None:
        self.prune()
        with self._lock:
            entry = self._entries.get(id_)
        return None if entry is None or entry[0] is None or not entry[0].is_file() else entry[0]

    def expires_at(self, id_: str) -> int | None:
        with self._lock:
            entry = self._entries.get(id_)
        return None if entry is None or self.ttl_s is None else int(entry[1] + self.ttl_s)

    def remove(self, id_: str) -> bool:
        with self._lock:
            entry = self._entries.pop(id_, None)
        if entry is not None and entry[0] is not None:
            entry[0].unlink(missing_ok=True)
        return entry is not None

    def prune(self) -> None:
        dropped = []
        now = time.time()
        with self._lock:
            while self._entries:
                id_, (path, created) = next(iter(self._entries.items()))
                if len(self._entries) <= self.keep and (self.ttl_s is None or now - created < self.ttl_s):
                    break
                self._entries.popitem(last=False)
                dropped.append((id_, path))
        for id_, path in dropped:
            if path is not None:
                path.unlink(missing_ok=True)
            if self.on_evict is not None:
                self.on_evict(id_)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Delete every file this store wrote (and the directory, when the store created it)."""
        self._stop.set()
        with self._lock:
            entries, self._entries = list(self._entries.values()), collections.OrderedDict()
        for path, _ in entries:
            if path is not None:
                path.unlink(missing_ok=True)
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)
