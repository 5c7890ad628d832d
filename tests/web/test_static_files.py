"""The page's files without a browser: vendored scripts, no outside address, the site copy."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from cellpose_finetuning.web import (
    PAGE_MOUNT,
    page_url,
    prepare_site,
    static_dir,
    static_mount_args,
)

STATIC = static_dir()
VENDOR = STATIC / "vendor"
OWN = [
    p for p in STATIC.rglob("*") if p.suffix in (".html", ".js", ".css") and VENDOR not in p.parents
]


def test_vendored_files_are_the_published_ones_with_their_licenses() -> None:
    readme = (VENDOR / "README.md").read_text()
    bundle = VENDOR / "hypha-rpc" / "hypha-rpc-websocket.min.mjs"
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() in readme
    for folder in (p for p in VENDOR.iterdir() if p.is_dir()):
        assert (folder / "LICENSE").is_file(), folder
        for file in folder.iterdir():
            assert f"{folder.name}/{file.name}" in readme, f"{file} is not listed in the README"


def test_the_page_refers_to_nothing_outside_its_server() -> None:
    assert len(OWN) >= 10
    for path in OWN:
        text = path.read_text()
        assert not re.search(r"https?://", text), f"{path.name} names an outside address"
        for spec in re.findall(r"""(?:import|from)\s*["']([^"']+)["']""", text):
            assert spec.startswith(("./", "../")), f"{path.name} imports {spec!r}"
    html = (STATIC / "index.html").read_text()
    for ref in re.findall(r"""(?:src|href)="([^"]+)\"""", html):
        assert ref.startswith("data:") or not re.match(r"^[a-z]+:|^//|^/", ref), ref


def test_prepare_site_copies_the_page_and_writes_its_config(tmp_path) -> None:
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "stale.js").write_text("old")
    site = prepare_site(tmp_path / "web", {"service_id": "ws-x/cellpose-finetuning"})
    assert (site / "index.html").read_text() == (STATIC / "index.html").read_text()
    assert (site / "vendor" / "hypha-rpc" / "LICENSE").is_file()
    assert not (site / "stale.js").exists()
    assert json.loads((site / "config.json").read_text()) == {
        "service_id": "ws-x/cellpose-finetuning"
    }


def test_static_mount_arguments() -> None:
    assert static_mount_args(STATIC) == ("--static-mounts", f"{PAGE_MOUNT}:{STATIC}")
    merged = static_mount_args(STATIC, ("--port", "1", "--static-mounts", "/x:/y"))
    assert merged == ("--port", "1", "--static-mounts", f"{PAGE_MOUNT}:{STATIC}", "/x:/y")
    with pytest.raises(ValueError, match="':'"):
        static_mount_args(STATIC.parent / "a:b")
    assert page_url("http://h:1/") == f"http://h:1{PAGE_MOUNT}/index.html"
