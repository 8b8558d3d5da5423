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


class DiskCache:
    def __init__(self, filename: str, what: str, consequence: str):
        self.filename = filename
        self.what = what  # "guard cache", named in the warnings
        self.consequence = consequence  # what a lost cache means, e.g. "checks will run again"
        self._data: dict | None = None
        self._lock = threading.RLock()

    def path(self) -> Path:
        root = os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "hubcompile"
        return Path(root) / self.filename

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
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)
            except OSError as e:
                log.warning("hubcompile: cannot write the %s %s (%s)", self.what, path, e)

    def clear(self, disk: bool = False) -> None:
        """Forget what was read (and delete the file with ``disk=True``)."""
        with self._lock:
            self._data = None
            if disk:
                self.path().unlink(missing_ok=True)
