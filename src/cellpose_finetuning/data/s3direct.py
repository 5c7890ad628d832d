"""Dataset files read straight from the S3 store behind Hypha's artifact manager.

On the embedded stack the service holds the S3 keys Hypha itself uses. After
the service's own permission check (``service/auth.py``, unchanged) the bytes
can then be read from S3 directly instead of asking Hypha for one presigned
URL per file: hypha 0.21.137's ``get_file`` sends one S3 HEAD per path, one
after the other, and signs each URL (about 2 ms of server CPU a file, more
than half of a 2,500-file fetch; docs/benchmarks.md).

Where the artifact manager keeps a file (hypha 0.21.137, ``artifact.py``:
``_get_s3_config`` and ``get_file``), for an artifact with no S3 settings of
its own::

    <workspace bucket>/<workspace>/<artifacts dir>/<_id>/v<version index>/<path>

``_id`` is the artifact's internal id, the version index the position of
the version in ``versions`` (the last one by default; 0 while nothing is
committed). Artifacts with S3 secrets of their own (or of their parent) live
elsewhere; the record does not show secrets, but their files are then not
under this key (the key holds the artifact's own never-reused id), so the read
finds nothing and the caller falls back to presigned URLs. Git-stored
artifacts and a requested version this module cannot place are never read
directly. Every read is checked against the listing's size.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DirectS3Reader", "S3Access"]

log = logging.getLogger(__name__)

#: Files read between two progress reports.
PROGRESS_EVERY = 25

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class S3Access:
    """Where the artifact manager's files are and the keys to read them (plain values).

    Given by the deploy layer (the embedded stack knows them); the secret is
    kept out of ``repr``.
    """

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    bucket: str
    region_name: str = "us-east-1"
    #: Hypha's ``artifacts_dir`` (its default, which the embedded stack keeps).
    artifacts_dir: str = "artifacts"


class DirectS3Reader:
    """Read artifact files from S3 with the service's keys (a pool of blocking boto3 calls).

    Parameters
    ----------
    access : S3Access
        The store and its keys.
    threads : int
        Reads in flight at once (and the S3 connection pool's size).
    """

    def __init__(self, access: S3Access, *, threads: int = 16) -> None:
        self.access = access
        self.threads = threads
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        #: Files read directly, and files sent back to presigned URLs (missing, other size).
        self.reads = 0
        self.fallbacks = 0

    def key_prefix(self, record: dict[str, Any], version: str | None = None) -> str | None:
        """``<workspace>/<artifacts dir>/<_id>/v<index>/`` of the artifact's files, or None.

        None where the files are not where the artifact manager's default
        layout puts them (git storage, S3 settings in the config) or where the
        version cannot be placed (``stage``, an unknown name): read those
        through presigned URLs.
        """
        config = record.get("config") or {}
        if config.get("storage") == "git" or config.get("s3"):
            return None
        workspace = str(record.get("workspace") or "")
        uid = str(record.get("_id") or "")
        if not _NAME.match(workspace) or not re.fullmatch(r"[0-9A-Za-z-]{8,64}", uid):
            return None
        versions = [str((v or {}).get("version", "")) for v in record.get("versions") or []]
        if version is None:
            index = max(0, len(versions) - 1)
        elif version == "latest" and versions:
            index = len(versions) - 1
        elif version in versions:
            index = versions.index(version)
        else:
            return None
        return f"{workspace}/{self.access.artifacts_dir}/{uid}/v{index}/"

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.access.endpoint_url,
                aws_access_key_id=self.access.access_key_id,
                aws_secret_access_key=self.access.secret_access_key,
                region_name=self.access.region_name,
                config=Config(
                    max_pool_connections=self.threads,
                    retries={"max_attempts": 3},
                    signature_version="s3v4",
                ),
            )
        return self._client

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads the blocking reads run in."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3-direct")
        return self._pool

    def read_to(
        self, key: str, dest: Path, size: int | None, last_modified: float | None
    ) -> str | None:
        """Copy object ``key`` to ``dest`` (blocking); None when done, else why not.

        Nothing is written unless the object exists and has ``size`` bytes
        (when known): a missing key or another size means "not the listed
        file", never wrong bytes in the cache. The file gets the store's
        ``last_modified`` as its mtime (the cache's identity check) and
        replaces ``dest`` atomically.
        """
        from botocore.exceptions import ClientError

        try:
            resp = self._s3().get_object(Bucket=self.access.bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket", "AccessDenied", "403"):
                return f"S3 {code}"
            raise
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{threading.get_ident()}.s3")
        written = 0
        with open(tmp, "wb") as fh:  # in chunks: a whole-slide image never sits in memory
            for chunk in resp["Body"].iter_chunks(1 << 20):
                fh.write(chunk)
                written += len(chunk)
        if size is not None and written != size:
            tmp.unlink()
            return f"{written} bytes in S3, {size} listed"
        if last_modified is not None:
            os.utime(tmp, (last_modified, last_modified))
        os.replace(tmp, dest)
        return None

    def list_folder(self, prefix: str) -> dict[str, tuple[int, float]]:
        """Objects directly below ``prefix`` (blocking): name -> (size, last-modified time).

        The values are those hypha 0.21.137's ``list_files`` reports (S3's
        ``Size`` and ``LastModified`` as a timestamp), so the cache's identity
        check holds whichever listed the files. Listing S3 directly spares
        Hypha's listing, which re-reads the folder from its start for every
        page of 1000 and builds a new S3 client per call.
        """
        out: dict[str, tuple[int, float]] = {}
        pages = self._s3().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.access.bucket, Prefix=prefix, Delimiter="/"):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) :]] = (int(obj["Size"]), obj["LastModified"].timestamp())
        return out

    async def stat(self, prefix: str, paths: list[str]) -> dict[str, tuple[int, float]] | None:
        """(size, last-modified time) of each path below ``prefix``; None if one is missing."""
        listed: dict[str, tuple[int, float]] = {}
        for folder in dict.fromkeys(p.rpartition("/")[0] for p in paths):
            below = f"{prefix}{folder}/" if folder else prefix
            got = await asyncio.to_thread(self.list_folder, below)
            listed.update({f"{folder}/{n}" if folder else n: v for n, v in got.items()})
        if any(p not in listed for p in paths):
            return None  # not where the default layout puts it: the artifact manager knows
        return {p: listed[p] for p in paths}

    async def fetch(
        self,
        keys: dict[str, str],
        local: dict[str, Path],
        files: dict[str, Any],
        arrived: Callable[[int], None],
    ) -> list[str]:
        """Read every path of ``keys`` into ``local[path]``; the paths that were not read.

        All reads go to the thread pool at once (one hand-over, as a plain
        ``ThreadPoolExecutor.map`` does): handing over one future per file
        from the event loop cost more than the reads of small files.

        Parameters
        ----------
        keys : dict
            Path in the artifact -> S3 key (:meth:`key_prefix` + path).
        local : dict
            Path -> where it goes in the cache.
        files : dict
            Path -> the listing's ``FileInfo`` (``size``, ``last_modified``).
        arrived : callable
            Called in the event loop with how many more files were read (every
            :data:`PROGRESS_EVERY` files and at the end).
        """
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        count = [0, 0]  # read, reported

        def one(path: str) -> str | None:
            info = files[path]
            why = self.read_to(keys[path], local[path], info.size, info.last_modified)
            if why is not None:
                log.info("%s: not read from S3 directly (%s); using a presigned URL", path, why)
                return path
            with lock:
                count[0] += 1
                if count[0] - count[1] >= PROGRESS_EVERY:
                    loop.call_soon_threadsafe(arrived, count[0] - count[1])
                    count[1] = count[0]
            return None

        def read_all() -> list[str | None]:
            return list(self.pool.map(one, list(keys)))

        try:
            missed = [p for p in await asyncio.to_thread(read_all) if p is not None]
        finally:
            if count[0] > count[1]:
                arrived(count[0] - count[1])
            self.reads += count[0]
        self.fallbacks += len(missed)
        return missed

    def close(self) -> None:
        """Stop the threads (reads in flight finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
