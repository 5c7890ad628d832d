"""Helpers the tests import: bounded waits, forged files, free ports, screenshots.

Fixtures stay in the ``conftest.py`` files; anything a test module imports
by name lives here, so no test imports from a conftest.
"""

from __future__ import annotations

import random
from pathlib import Path


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (status files have no events)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def forge_tiff_size(path, height: int, width: int) -> None:
    """Rewrite a small TIFF's header so that it declares ``height x width`` pixels.

    Gives a few-hundred-byte file that claims gigabytes, to test that readers
    refuse it from the header without reading or allocating the pixels.
    """
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        fields = [(tags[n].valueoffset, int(tags[n].dtype)) for n in ("ImageLength", "ImageWidth")]
    data = bytearray(path.read_bytes())
    for (offset, dtype), value in zip(fields, (height, width), strict=True):
        struct.pack_into("<H" if dtype == 3 else "<I", data, offset, value)
    path.write_bytes(bytes(data))


async def follow_status(svc, session_id: str, done=None, interval: float = 0.5, timeout=600):
    """Poll a service's ``get_training_status`` until ``done(status)``.

    Returns the last status and every status seen (RPC status has no events).
    """
    import asyncio
    import time

    done = done or (lambda st: st["status_type"] in ("completed", "failed"))
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        status = await svc.get_training_status(session_id)
        seen.append(status)
        if done(status):
            return status, seen
        await asyncio.sleep(interval)
    raise TimeoutError(f"session {session_id} not done within {timeout} s: {seen[-1]}")


def free_ports(n: int) -> list[int]:
    """``n`` ports that are free, each with port + 10000 free too (SeaweedFS gRPC).

    Both stay below Linux's ephemeral range (32768+), so an outgoing connection
    cannot take a chosen port between this check and the server's bind.
    """
    from cellpose_finetuning.deploy.stack import port_is_free

    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(11000, 22000)
        if p not in ports and port_is_free(p) and port_is_free(p + 10000):
            ports.append(p)
    return ports


def save_screenshot(page, path: Path, *, full_page: bool = True) -> Path:
    """A screenshot, reduced to a 128-colour PNG so that the docs stay small."""
    from PIL import Image

    page.screenshot(path=str(path), full_page=full_page)
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path
