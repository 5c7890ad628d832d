"""Browser tests of the web page: the real ``serve`` command and a real headless Chromium.

The stack is started the way a user starts it (``cellpose-finetuning serve`` in a
subprocess, on random free ports, with the tiny network offered as ``tiny``),
and the page is opened at the address ``serve`` prints. Chromium is Debian's
(``/usr/bin/chromium``, or ``$CHROMIUM``), driven by Playwright for Python.

Without Playwright or Chromium the ``ui`` tests are skipped, unless
``CPFT_REQUIRE_UI=1`` (``make test-ui`` sets it): then they fail.
Screenshots go to ``$CPFT_SCREENSHOT_DIR`` (``make test-ui``: ``docs/screenshots``),
else to a temporary folder.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cellpose_finetuning.deploy.testing import free_ports
from cellpose_finetuning.web import static_dir

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
VIEWPORT = {"width": 1200, "height": 860}


def _missing(reason: str) -> None:
    if os.environ.get("CPFT_REQUIRE_UI") == "1":
        pytest.fail(f"{reason} (make test-ui installs it)")
    pytest.skip(reason)


def chromium_path() -> str:
    """Debian's Chromium, or ``$CHROMIUM``."""
    for candidate in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    _missing("no Chromium: apt-get install chromium, or set $CHROMIUM")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the stack
@dataclass
class ServedStack:
    """A running ``cellpose-finetuning serve``: its printed addresses and data directory."""

    page_url: str
    server_url: str
    token: str
    data_dir: Path
    output: str
    _tokens: dict[str, str] = field(default_factory=dict)

    def token_for(self, user: str) -> str:
        """A token minted by ``cellpose-finetuning token --user USER``, as a user would."""
        if user not in self._tokens:
            out = subprocess.run(
                [*_cli(), "token", "--data-dir", str(self.data_dir), "--user", user],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            self._tokens[user] = out.stdout.strip().splitlines()[-1]
        return self._tokens[user]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("cellpose-finetuning")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cellpose_finetuning.cli import main; main()"]


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_model) -> Iterator[ServedStack]:
    """``cellpose-finetuning serve`` on free ports, with ``tiny`` among its models."""
    data_dir = tmp_path_factory.mktemp("web-stack")
    (data_dir / "models").mkdir()
    shutil.copy(tiny_model, data_dir / "models" / "tiny.pth")
    hypha, s3, master, volume, filer = free_ports(5)
    cmd = [
        *_cli(),
        "serve",
        "--data-dir",
        str(data_dir),
        "--hypha-port",
        str(hypha),
        "--s3-port",
        str(s3),
        "--weed-master-port",
        str(master),
        "--weed-volume-port",
        str(volume),
        "--weed-filer-port",
        str(filer),
        "--user",
        "alice",
    ]
    log_path = data_dir / "serve.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
        )
    try:
        deadline = time.monotonic() + 240
        output = ""
        while "Press Ctrl-C" not in output:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}):\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not come up in 240 s:\n{log_path.read_text()}")
            time.sleep(0.5)
            output = log_path.read_text()
        fields = dict(re.findall(r"^\s+(server URL|web page)\s+: (\S+)", output, re.M))
        yield ServedStack(
            page_url=fields.get("web page", ""),
            server_url=fields["server URL"],
            # printed masked (stdout is not a terminal): the full one is in connection.json
            token=json.loads((data_dir / "connection.json").read_text())["token"],
            data_dir=data_dir,
            output=output,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's), shared by the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[ui]')")
    executable = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class PageRecord:
    """What a page did: requests it tried outside the local server, and its JS errors."""

    blocked: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def open_page(browser, record: PageRecord, **context_args):
    """A fresh context (own storage) whose requests to anything but localhost fail."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True, **context_args)

    def route(route) -> None:
        url = route.request.url
        host = urlparse(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            record.requests.append(url)
            route.continue_()
        else:
            record.blocked.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", route)
    page = context.new_page()
    page.on("pageerror", lambda exc: record.errors.append(str(exc)))
    return page


@pytest.fixture
def page_record() -> PageRecord:
    return PageRecord()


@pytest.fixture
def page(browser, page_record):
    """A page in its own context; afterwards no JS error and no outside request may remain."""
    page = open_page(browser, page_record)
    yield page
    page.context.close()
    assert page_record.errors == [], f"JavaScript errors: {page_record.errors}"
    assert page_record.blocked == [], f"requests outside the local server: {page_record.blocked}"


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    """Where step screenshots go: ``$CPFT_SCREENSHOT_DIR`` or a temporary folder."""
    folder = os.environ.get("CPFT_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- static files only
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def static_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The page's files (and a scratch folder at ``/scratch/``) on a plain local HTTP server.

    For testing the page's own modules (pairing, TIFF) without a stack.
    """
    root = tmp_path_factory.mktemp("static-root")
    shutil.copytree(static_dir(), root / "app")
    (root / "scratch").mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root / "scratch"
    finally:
        server.shutdown()
        with contextlib.suppress(Exception):
            server.server_close()
