"""A size bound for the download cache: least recently used artifact versions go first.

The cache (:class:`~cellpose_finetuning.data.artifacts.ArtifactFiles`) keeps
files as ``<root>/<artifact uid>/<version>/<path>``. The unit of eviction is
one version folder (``<uid>/<version>``, its *key*): a dataset version is used
whole (a training's pairs, a slide and its neighbours), and half a version
would only be downloaded again. Each use (a download, a cache hit) touches a
marker ``<root>/<uid>/.<version>.used`` whose mtime is the last use: atime is
not reliable (``noatime``, ``relatime``) and a folder's mtime only moves when
a file is added. The marker's name cannot be a version's (versions never start
with a dot).

A key in use is *pinned* (an in-process count): a download, and whoever reads
the downloaded files afterwards (an inference, a training's preparation),
holds a pin, and eviction never removes a pinned folder. A folder is first
renamed out of the tree under the same lock that pins take, then deleted, so a
reader pinning it at that moment either keeps it or finds it gone and
downloads it again, never half of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cellpose_finetuning.data.pairing import safe_relpath

__all__ = ["CacheBound", "CachedVersion", "link_tree"]

log = logging.getLogger("cellpose_finetuning.data.cache")
#: Where folders wait for deletion (renamed out of the tree first).
TRASH = ".trash"


@dataclass(frozen=True)
class CachedVersion:
    """One ``<uid>/<version>`` folder: its key, bytes and last use (epoch seconds)."""

    key: str
    size: int
    last_used: float


def _tree_size(folder: Path) -> tuple[int, float]:
    """Bytes of the files below ``folder`` and the newest mtime of its folders.

    A folder's mtime moves when a file arrives in it (a file's own mtime is the
    store's): the last download, for a version that has no marker yet.
    """
    total, newest = 0, 0.0
    for dirpath, _dirs, files in os.walk(folder):
        try:
            newest = max(newest, os.stat(dirpath).st_mtime)
        except OSError:
            continue
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size
    return total, newest


class CacheBound:
    """Keep a download cache under ``max_bytes`` by evicting unpinned, least recently used versions.

    Parameters
    ----------
    root : path-like
        The cache folder (``<root>/<uid>/<version>/...``).
    max_bytes : int
        The bound; 0: unbounded (nothing is ever evicted).
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self._evicting = threading.Lock()

    # -- use -----------------------------------------------------------------
    def _marker(self, key: str) -> Path:
        uid, version = key.split("/")
        return self.root / uid / f".{version}.used"

    def touch(self, key: str) -> None:
        """Record a use of ``key`` now."""
        marker = self._marker(key)
        now = time.time()
        with self._lock:  # not while eviction removes an empty <uid> folder
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os.utime(marker, (now, now))

    def acquire(self, key: str) -> None:
        """Pin ``key``: it is not evicted until as many :meth:`release` calls."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def release(self, key: str) -> None:
        """Drop one pin of ``key`` (its use ends now: recorded)."""
        with suppress(OSError):
            self.touch(key)
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)

    @contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """Pin ``key`` for the block (and record its use)."""
        self.acquire(key)
        try:
            self.touch(key)
            yield
        finally:
            self.release(key)

    def is_pinned(self, key: str) -> bool:
        """Whether something holds a pin on ``key``."""
        with self._lock:
            return key in self._pins

    # -- eviction ------------------------------------------------------------
    def versions(self) -> list[CachedVersion]:
        """Every cached version, least recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for uid_dir in self.root.iterdir():
            if not uid_dir.is_dir() or uid_dir.name.startswith("."):
                continue
            for folder in uid_dir.iterdir():
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                key = f"{uid_dir.name}/{folder.name}"
                size, newest = _tree_size(folder)
                with suppress(OSError):  # the marker when there is one: files keep store times
                    newest = self._marker(key).stat().st_mtime
                out.append(CachedVersion(key, size, newest))
        return sorted(out, key=lambda v: (v.last_used, v.key))

    def evict(self) -> list[str]:
        """Remove least recently used, unpinned versions until the cache is within the bound.

        Returns
        -------
        list of str
            The evicted keys, in order. Pinned versions stay even when the
            cache is still over the bound then.
        """
        if self.max_bytes <= 0:
            return []
        with self._evicting:
            return self._evict()

    def _evict(self) -> list[str]:
        self._empty_trash()
        versions = self.versions()
        total = sum(v.size for v in versions)
        evicted: list[str] = []
        for version in versions:
            if total <= self.max_bytes:
                break
            if self._remove(version.key):
                total -= version.size
                evicted.append(version.key)
        if total > self.max_bytes:
            log.warning(
                "download cache holds %d bytes in versions in use (bound %d)", total, self.max_bytes
            )
        return evicted

    def _remove(self, key: str) -> bool:
        """Move ``key``'s folder out of the tree (unless pinned), then delete it."""
        trash = self.root / TRASH / uuid.uuid4().hex
        with self._lock:
            if key in self._pins:
                return False
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(self.root / key, trash)
            except OSError as exc:
                log.warning("cannot evict %s from the download cache: %s", key, exc)
                return False
            self._marker(key).unlink(missing_ok=True)
            with suppress(OSError):  # only when no other version is left
                (self.root / key.split("/")[0]).rmdir()
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _empty_trash(self) -> None:
        """Delete what an interrupted eviction left in the trash."""
        shutil.rmtree(self.root / TRASH, ignore_errors=True)


def link_tree(files: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Hard-link (else copy) each file to ``dest/<its key>``: a copy that eviction never touches.

    Parameters
    ----------
    files : dict
        Relative path (already checked, e.g. a dataset path) -> existing file.
    dest : Path
        Folder to create the links below.

    Returns
    -------
    dict
        The same keys -> the new paths.
    """
    out = {}
    for rel, src in files.items():
        target = dest / safe_relpath(rel, "path")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
        out[rel] = target
    return out
