"""A small JSON cache on disk, shared by the numerical guards and the performance guard.

One JSON object per file in ``$HUBCOMPILE_CACHE_DIR`` (default ``~/.cache/hubcompile``),
read once per process and rewritten atomically on each store, so a concurrent reader
sees the old file or the new one. A file that cannot be read or written only costs the
work it would have saved: one warning, and the cache starts empty.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "HUBCOMPILE_CACHE_DIR"


def cache_root() -> Path:
    """``$HUBCOMPILE_CACHE_DIR``, or ``~/.cache/hubcompile``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "hubcompile")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename, so that a concurrent reader
    sees the old file or the new one; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class DiskCache:
    def __init__(self, filename: str, what: str, consequence: str):
        self.filename = filename
        self.what = what  # "guard cache", named in the warnings
        self.consequence = consequence  # what a lost cache means, e.g. "checks will run again"
        self._data: dict | None = None
        self._lock = threading.RLock()

    def path(self) -> Path:
        return cache_root() / self.filename

    def _load(self) -> dict:
        if self._data is None:
            path = self.path()
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except Exception as e:  # noqa: BLE001
                log.warning("hubcompile: ignoring unreadable %s %s (%s: %s); %s", self.what, path,
                            type(e).__name__, e, self.consequence)
                data = {}
            self._data = data
        return self._data

    def get(self, key: str):
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, value) -> None:
        with self._lock:
            data = self._load()
            data[key] = value
            path = self.path()
            try:
                write_atomically(path, json.dumps(data).encode())
            except OSError as e:
                log.warning("hubcompile: cannot write the %s %s (%s)", self.what, path, e)

    def clear(self, disk: bool = False) -> None:
        """Forget what was read (and delete the file with ``disk=True``)."""
        with self._lock:
            self._data = None
            if disk:
                self.path().unlink(missing_ok=True)
