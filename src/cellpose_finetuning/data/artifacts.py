"""Hypha artifacts as a data source: list (paginated), download (concurrent, cached).

The artifact manager's ``list_files`` returns at most ``limit`` entries per
call (1000 by default, which was the original service's file cap); we page
with ``offset`` until a short page. Files are fetched through presigned S3
URLs asked for in batches and downloaded concurrently with httpx into a
cache, so a second run on the same data downloads nothing. On the embedded
stack the service gives :class:`ArtifactFiles` a direct S3 reader
(:mod:`cellpose_finetuning.data.s3direct`): the same files, read with the
service's S3 keys, without a presigned URL per file.

The cache is keyed by what identifies the *bytes*, never by a name someone
else could reuse: the artifact's internal id (a UUID that a deleted and
re-created alias does not get back), its version, the path, and the file's
size and last-modified time as the store lists them (a cached file carries
the store's time as its own mtime; any difference means "download again").
So a dataset deleted and re-created under the same alias, a new version, or
a file rewritten in place is never served from stale files.

The cache can be bounded (``max_bytes``, :mod:`cellpose_finetuning.data.cache`):
after each download the least recently used artifact versions are removed
until it fits, except versions in use. A download pins its version while it
runs; whoever reads the files afterwards holds a pin too (:meth:`ArtifactFiles.fetched`,
or :meth:`ArtifactFiles.pin` and :meth:`ArtifactFiles.unpin`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cellpose_finetuning.data.cache import CacheBound
from cellpose_finetuning.data.pairing import safe_relpath, spec_dir
from cellpose_finetuning.errors import Forbidden, InvalidInput, NotFound

if TYPE_CHECKING:
    from cellpose_finetuning.data.s3direct import DirectS3Reader

__all__ = [
    "ArtifactFiles",
    "FileInfo",
    "parse_artifact_id",
    "upload_files",
]

_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PAGE = 1000
log = logging.getLogger("cellpose_finetuning.data.artifacts")
#: Presigned URLs asked for per call, and calls in flight at once (downloads).
URL_BATCH = 100
URL_CALLS = 4
#: Presigned PUT URLs per call (uploads).
PUT_BATCH = 500


def parse_artifact_id(artifact: str, arg: str = "artifact") -> str:
    """Normalise ``workspace/alias`` or a full artifact URL to ``workspace/alias``.

    Accepted URLs look like ``http(s)://host/<workspace>/artifacts/<alias>[/...]``.

    Raises
    ------
    InvalidInput
    """
    if not isinstance(artifact, str) or not artifact.strip():
        raise InvalidInput(arg, "must be 'workspace/alias' or an artifact URL")
    artifact = artifact.strip()
    if artifact.startswith(("http://", "https://")):
        parts = [p for p in urlparse(artifact).path.split("/") if p]
        if len(parts) < 3 or parts[1] != "artifacts":
            raise InvalidInput(
                arg, f"{artifact!r} is not an artifact URL (…/<ws>/artifacts/<alias>)"
            )
        workspace, alias = parts[0], parts[2]
    else:
        if artifact.count("/") != 1:
            raise InvalidInput(arg, f"{artifact!r}: expected 'workspace/alias'")
        workspace, alias = artifact.split("/")
    for part in (workspace, alias):
        if not _ALIAS.match(part):
            raise InvalidInput(arg, f"{artifact!r}: invalid workspace or alias {part!r}")
    return f"{workspace}/{alias}"


@dataclass(frozen=True)
class FileInfo:
    """A file as the artifact store lists it: what the cache checks."""

    size: int | None
    last_modified: float | None

    def matches(self, local: Path) -> bool:
        """Whether ``local`` holds these bytes (same size, mtime set from the store)."""
        if self.size is None or self.last_modified is None:
            return False
        try:
            st = local.stat()
        except OSError:
            return False
        return st.st_size == self.size and abs(st.st_mtime - self.last_modified) < 1e-3


def artifact_uid(record: dict[str, Any]) -> str:
    """The artifact's internal id (``_id``): never reused, unlike ``workspace/alias``."""
    uid = str(record.get("_id") or "")
    if not re.fullmatch(r"[0-9A-Za-z-]{8,64}", uid):
        raise InvalidInput("artifact", f"{record.get('id')!r}: the store gave no usable id")
    return uid


def artifact_version(record: dict[str, Any]) -> str:
    """The version the store serves by default: the last committed one, else ``stage``."""
    versions = record.get("versions") or []
    name = str((versions[-1] or {}).get("version", "")) if versions else "stage"
    return name if _ALIAS.match(name) else "stage"


def _map_error(exc: Exception, artifact_id: str) -> Exception:
    text = str(exc)
    if "does not exist" in text or "KeyError" in text or "not found" in text.lower():
        return NotFound("artifact", artifact_id)
    if "PermissionError" in text or "permission" in text.lower():
        return Forbidden(f"artifact {artifact_id!r}: permission denied")
    return exc


class ArtifactFiles:
    """Read files of dataset artifacts through the artifact manager.

    Parameters
    ----------
    artifact_manager : Any
        A hypha-rpc proxy of ``public/artifact-manager``.
    cache_dir : path-like
        Where downloaded files are kept.
    concurrency : int
        Parallel downloads.
    direct : DirectS3Reader, optional
        Reads files straight from the store's S3 (the embedded stack, where
        the service holds the keys) instead of through presigned URLs; a
        file it cannot place or find goes through a presigned URL. Whoever
        calls :meth:`download` has checked the caller's permission already.
    max_bytes : int
        Bound of the cache (least recently used versions not in use are
        evicted after each download); 0: unbounded.
    """

    def __init__(
        self,
        artifact_manager: Any,
        cache_dir: str | os.PathLike[str],
        *,
        concurrency: int = 16,
        direct: DirectS3Reader | None = None,
        max_bytes: int = 0,
    ) -> None:
        self.am = artifact_manager
        self.cache_dir = Path(cache_dir)
        self.bound = CacheBound(self.cache_dir, max_bytes)
        self.concurrency = concurrency
        self.direct = direct
        #: Who owns which workspace (``service.auth.WorkspaceOwners``), set by the service.
        self.owners: Any = None

    async def read(self, artifact_id: str) -> dict[str, Any]:
        """The artifact's record (manifest, config, versions...)."""
        try:
            info = await self.am.read(artifact_id)
        except Exception as exc:
            raise _map_error(exc, artifact_id) from exc
        return dict(info)

    async def list_entries(
        self, artifact_id: str, dir_path: str, *, version: str | None = None
    ) -> dict[str, FileInfo]:
        """Files directly in ``dir_path`` (all pages), with size and last-modified time.

        Returns
        -------
        dict
            Path relative to the artifact root -> :class:`FileInfo`.
        """
        dir_path = dir_path.strip("/")
        entries: dict[str, FileInfo] = {}
        offset = 0
        while True:
            try:
                page = await self.am.list_files(
                    artifact_id,
                    dir_path=dir_path or None,
                    limit=PAGE,
                    offset=offset,
                    version=version,
                )
            except Exception as exc:
                raise _map_error(exc, artifact_id) from exc
            for item in page:
                if item.get("type", "file") == "file":
                    name = f"{dir_path}/{item['name']}" if dir_path else item["name"]
                    size, modified = item.get("size"), item.get("last_modified")
                    entries[name] = FileInfo(
                        int(size) if size is not None else None,
                        float(modified) if modified is not None else None,
                    )
            if len(page) < PAGE:
                return entries
            offset += PAGE

    async def list_dir(
        self, artifact_id: str, dir_path: str, *, version: str | None = None
    ) -> list[str]:
        """Paths of the files directly in ``dir_path`` (all pages), relative to the root."""
        return list(await self.list_entries(artifact_id, dir_path, version=version))

    async def list_specs_info(
        self, artifact_id: str, specs: Iterable[str], *, version: str | None = None
    ) -> dict[str, FileInfo]:
        """Every file in the folders the pairing specs refer to, with its :class:`FileInfo`."""
        out: dict[str, FileInfo] = {}
        for folder in dict.fromkeys(spec_dir(s) for s in specs):
            out.update(await self.list_entries(artifact_id, folder, version=version))
        return out

    async def list_specs(
        self, artifact_id: str, specs: Iterable[str], *, version: str | None = None
    ) -> list[str]:
        """All file names in the folders that the given pairing specs refer to."""
        return list(await self.list_specs_info(artifact_id, specs, version=version))

    async def list_tree(self, artifact_id: str, dir_path: str, *, max_files: int) -> list[str]:
        """Paths of all files below ``dir_path``, sub-folders included (all pages).

        Raises
        ------
        ResourceLimit
            Past ``max_files`` files.
        """
        from cellpose_finetuning.errors import ResourceLimit

        found: list[str] = []
        folders = [dir_path.strip("/")]
        while folders:
            folder = folders.pop()
            offset = 0
            while True:
                try:
                    page = await self.am.list_files(
                        artifact_id, dir_path=folder or None, limit=PAGE, offset=offset
                    )
                except Exception as exc:
                    raise _map_error(exc, artifact_id) from exc
                for item in page:
                    path = f"{folder}/{item['name']}" if folder else item["name"]
                    if item.get("type", "file") == "file":
                        found.append(path)
                    else:
                        folders.append(path)
                if len(found) > max_files:
                    raise ResourceLimit(f"more than {max_files} files below {dir_path!r}")
                if len(page) < PAGE:
                    break
                offset += PAGE
        return found

    async def fetch_file(self, artifact_id: str, path: str, dest: Path) -> Path:
        """Download one file to ``dest`` (no cache), replacing it atomically."""
        import httpx

        try:
            url = await self.am.get_file(artifact_id, file_path=path)
        except Exception as exc:
            raise _map_error(exc, artifact_id) from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        transport = httpx.AsyncHTTPTransport(retries=3)
        async with (
            httpx.AsyncClient(transport=transport, timeout=600, follow_redirects=True) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code != 200:
                raise InvalidInput(path, f"download failed with HTTP {resp.status_code}")
            with open(tmp, "wb") as fh:
                async for chunk in resp.aiter_bytes(1 << 20):
                    fh.write(chunk)
        os.replace(tmp, dest)
        return dest

    async def stat(
        self, artifact_id: str, paths: Iterable[str], *, version: str | None = None
    ) -> dict[str, FileInfo]:
        """:class:`FileInfo` of each path, from listings of their folders.

        Raises
        ------
        InvalidInput
            Naming the first path that is not in the artifact.
        """
        paths = list(paths)
        listed: dict[str, FileInfo] = {}
        for folder in dict.fromkeys(p.rpartition("/")[0] for p in paths):
            listed.update(await self.list_entries(artifact_id, folder, version=version))
        for p in paths:
            if p not in listed:
                raise InvalidInput(p, "no such file in the artifact")
        return {p: listed[p] for p in paths}

    def cache_path(self, record: dict[str, Any], path: str, version: str | None = None) -> Path:
        """Local path of a cached file: keyed by the artifact's internal id and version.

        ``version`` (a version asked for by name) replaces the default one.
        """
        return self._cache_root(record, version) / safe_relpath(path, "path")

    def _cache_root(self, record: dict[str, Any], version: str | None) -> Path:
        return self.cache_dir / self.cache_key(record, version)

    def cache_key(self, record: dict[str, Any], version: str | None = None) -> str:
        """``<uid>/<version>``: the cached version a record (and version name) reads from."""
        name = version if version and _ALIAS.match(version) else artifact_version(record)
        return f"{artifact_uid(record)}/{name}"

    def pin(self, record: dict[str, Any], version: str | None = None) -> str:
        """Keep the record's cached version from eviction until :meth:`unpin` (returns its key)."""
        key = self.cache_key(record, version)
        self.bound.acquire(key)
        return key

    def unpin(self, key: str) -> None:
        """Drop a pin taken with :meth:`pin`."""
        self.bound.release(key)

    @asynccontextmanager
    async def fetched(
        self,
        artifact_id: str,
        paths: list[str],
        *,
        record: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[dict[str, Path]]:
        """:meth:`download`, the files staying in the cache until the block ends."""
        if record is None:
            record = await self.read(artifact_id)
        key = self.pin(record, kwargs.get("version"))
        try:
            yield await self.download(artifact_id, paths, record=record, **kwargs)
        finally:
            self.unpin(key)

    async def download(
        self,
        artifact_id: str,
        paths: list[str],
        *,
        record: dict[str, Any] | None = None,
        files: dict[str, FileInfo] | None = None,
        version: str | None = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> dict[str, Path]:
        """Download files (those not cached with the same identity) and return their local paths.

        Parameters
        ----------
        artifact_id : str
            ``workspace/alias``.
        paths : list of str
            Paths in the artifact.
        record : dict, optional
            The artifact's record (``read``); read here when not given.
        files : dict, optional
            :class:`FileInfo` of the paths (from a listing); listed here when not given.
        version : str, optional
            Artifact version to fetch.
        progress : callable, optional
            Called with (done, total) as files arrive.
        """
        if record is None:
            record = await self.read(artifact_id)
        key = self.cache_key(record, version)
        with self.bound.pinned(key):
            local, fetched = await self._download(
                artifact_id, paths, record, files, version, progress
            )
            if fetched:  # a cache hit adds nothing: no need to look at the whole cache
                await self._evict()
        return local

    async def _evict(self) -> None:
        """Bring the cache within its bound (versions in use stay); a failure is only logged."""
        if self.bound.max_bytes <= 0:
            return
        try:
            await asyncio.to_thread(self.bound.evict)
        except Exception:
            log.exception("evicting from the download cache failed; next download tries again")

    async def _download(
        self,
        artifact_id: str,
        paths: list[str],
        record: dict[str, Any],
        files: dict[str, FileInfo] | None,
        version: str | None,
        progress: Callable[[int, int], Any] | None,
    ) -> tuple[dict[str, Path], int]:
        """:meth:`download` of one pinned version; also how many files were fetched."""
        # Where the default layout puts the files in S3; None: presigned URLs only.
        prefix = self.direct.key_prefix(record, version) if self.direct is not None else None
        if files is None or any(p not in files for p in paths):
            missing = [p for p in paths if p not in (files or {})]
            listed = await self._direct_stat(prefix, missing)
            if listed is None:
                listed = await self.stat(artifact_id, missing, version=version)
            files = {**(files or {}), **listed}
        root = self._cache_root(record, version)
        local = {p: root / safe_relpath(p, "path") for p in paths}
        todo = [p for p, dest in local.items() if not files[p].matches(dest)]
        fetched = len(todo)
        total, done = len(paths), len(paths) - len(todo)
        if progress:
            progress(done, total)

        def arrived(files: int = 1) -> None:
            nonlocal done
            done += files
            if progress:
                progress(done, total)

        if todo and prefix is not None and self.direct is not None:
            keys = {p: prefix + safe_relpath(p, "path") for p in todo}
            todo = await self.direct.fetch(keys, local, files, arrived)
        if todo:
            await self._download_presigned(artifact_id, todo, local, files, version, arrived)
        return local, fetched

    async def _direct_stat(
        self, prefix: str | None, paths: list[str]
    ) -> dict[str, FileInfo] | None:
        """``paths`` listed from S3 directly below ``prefix``; None: ask the artifact manager."""
        got = await self.direct.stat(prefix, paths) if prefix and self.direct else None
        return None if got is None else {p: FileInfo(*got[p]) for p in paths}

    async def _download_presigned(
        self,
        artifact_id: str,
        todo: list[str],
        local: dict[str, Path],
        files: dict[str, FileInfo],
        version: str | None,
        arrived: Callable[[int], None],
    ) -> None:
        """Download ``todo`` through presigned URLs asked for in batches."""
        import httpx

        sem = asyncio.Semaphore(self.concurrency)
        url_calls = asyncio.Semaphore(URL_CALLS)
        transport = httpx.AsyncHTTPTransport(retries=3)
        async with httpx.AsyncClient(
            transport=transport, timeout=120, follow_redirects=True
        ) as client:

            async def fetch(path: str, url: str) -> None:
                dest = local[path]
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(
                    f".{dest.name}.{hashlib.md5(path.encode()).hexdigest()[:6]}.part"
                )
                async with sem, client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise InvalidInput(path, f"download failed with HTTP {resp.status_code}")
                    with open(tmp, "wb") as fh:
                        async for chunk in resp.aiter_bytes(1 << 20):
                            fh.write(chunk)
                info = files[path]
                if info.last_modified is not None:
                    os.utime(tmp, (info.last_modified, info.last_modified))
                os.replace(tmp, dest)
                arrived(1)

            async def batch(paths: list[str]) -> None:
                # Presigning costs the server ~2 ms a file (one S3 HEAD each), so
                # URL batches are asked for a few at a time and each batch's files
                # download as soon as its URLs arrive, while later batches are signed.
                async with url_calls:
                    try:
                        got = await self.am.get_file(
                            artifact_id, file_path=paths, version=version, silent=True
                        )
                    except Exception as exc:
                        raise _map_error(exc, artifact_id) from exc
                urls = got if isinstance(got, dict) else dict(zip(paths, [got], strict=False))
                await asyncio.gather(*(fetch(p, urls[p]) for p in paths))

            batches = [
                asyncio.ensure_future(batch(todo[i : i + URL_BATCH]))
                for i in range(0, len(todo), URL_BATCH)
            ]
            try:
                await asyncio.gather(*batches)
            except BaseException:
                # One failure ends the fetch: stop the other batches before the
                # HTTP client closes under them.
                for task in batches:
                    task.cancel()
                await asyncio.gather(*batches, return_exceptions=True)
                raise


async def upload_files(
    artifact_manager: Any,
    artifact_id: str,
    files: dict[str, Path],
    *,
    concurrency: int = 16,
    progress: Callable[[int, int], Any] | None = None,
    commit: bool = True,
) -> list[str]:
    """Upload local files into a staged artifact and commit it.

    Presigned PUT URLs are asked for in batches of 500 (one ``put_file`` call
    per file is slow and locks SQLite under concurrency), then the files are
    sent concurrently.

    Parameters
    ----------
    artifact_manager : Any
        hypha-rpc proxy of ``public/artifact-manager``.
    artifact_id : str
        A staged artifact.
    files : dict
        Path inside the artifact -> local file.
    concurrency : int
        Parallel uploads.
    progress : callable, optional
        Called with (done, total).
    commit : bool
        Commit the artifact afterwards.

    Returns
    -------
    list of str
        The uploaded paths, sorted.
    """
    import httpx

    names = sorted(files)
    urls: dict[str, str] = {}
    for i in range(0, len(names), PUT_BATCH):
        batch = names[i : i + PUT_BATCH]
        got = await artifact_manager.put_file(artifact_id, file_path=batch)
        urls.update(got if isinstance(got, dict) else dict(zip(batch, [got], strict=False)))
    sem = asyncio.Semaphore(concurrency)
    done = 0
    transport = httpx.AsyncHTTPTransport(retries=3)
    async with httpx.AsyncClient(transport=transport, timeout=300) as client:

        async def send(name: str) -> None:
            nonlocal done
            async with sem:
                resp = await client.put(urls[name], content=files[name].read_bytes())
                if resp.status_code >= 400:
                    raise InvalidInput(name, f"upload failed with HTTP {resp.status_code}")
            done += 1
            if progress:
                progress(done, len(names))

        await asyncio.gather(*(send(n) for n in names))
    if commit:
        await artifact_manager.commit(artifact_id)
    return names
