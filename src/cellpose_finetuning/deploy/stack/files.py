"""Files only their user may read: the data directory's mode and atomic private writes.

S3 volumes, the Hypha database, cached datasets, sessions, logs, the stack's
secrets and ``connection.json`` hold users' data or credentials; nobody else
on the machine may read them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "make_private", "write_private"]

#: Files the stack and the service create are readable by their user only.
PRIVATE_UMASK = 0o077


def make_private(data_dir: Path) -> Path:
    """Create ``data_dir`` as 0700 and take group/other bits off everything in it.

    S3 volumes, the Hypha database, cached datasets, sessions and logs hold
    users' data and the stack's secrets; nobody else on the machine may read them.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    return data_dir


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
