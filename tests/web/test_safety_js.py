"""The page against a fake service: only safe links, and a warning for a foreign service.

The attack: mallory registers her own service and sends alice a link to the
page with ``?service=<mallory's>``; that service answers with ``javascript:``
links and addresses elsewhere. The page must say that the service is not the
server's own, never log in to it by itself, and put no such address in an href.

``js/safety.js`` is checked in Node.js (default suite) and in Chromium (``ui``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from cellpose_finetuning.web import static_dir

ORIGIN = "http://127.0.0.1:9527"
HREF_CASES = [
    # (returned by a service, what goes into href)
    (f"{ORIGIN}/ws-user-alice/artifacts/m1", f"{ORIGIN}/ws-user-alice/artifacts/m1"),
    (f"{ORIGIN}/ws/artifacts/m1/create-zip-file", f"{ORIGIN}/ws/artifacts/m1/create-zip-file"),
    ("/ws/artifacts/m1", f"{ORIGIN}/ws/artifacts/m1"),
    ("javascript:alert(document.cookie)", None),
    ("JavaScript:alert(1)", None),
    (" javascript:alert(1)", None),
    ("data:text/html,<script>alert(1)</script>", None),
    ("vbscript:msgbox(1)", None),
    ("https://evil.example/ws/artifacts/m1", None),
    ("http://127.0.0.1:9999/ws/artifacts/m1", None),  # another port is another origin
    ("//evil.example/x", None),
    ("", None),
    (None, None),
    (42, None),
]
WARN_CASES = [
    ("bioimage-io/cellpose-finetuning", "bioimage-io/cellpose-finetuning", False),
    ("ws-user-mallory/cellpose-finetuning", "bioimage-io/cellpose-finetuning", True),
    ("bioimage-io/cellpose-finetuning", "", False),  # no config.json: nothing to compare
]
JS_RUNNER = """
function runCases(m, args) {
  return {
    hrefs: args.hrefs.map(([url]) => m.safeHref(url, args.origin)),
    warnings: args.warns.map(([id, configured]) => m.serviceWarning(id, configured)),
  };
}
"""


def _check(js: dict) -> None:
    assert js["hrefs"] == [want for _, want in HREF_CASES]
    for (service_id, _, warn), text in zip(WARN_CASES, js["warnings"], strict=True):
        assert bool(text) == warn, (service_id, text)
        if warn:
            assert service_id in text and "trust" in text


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_only_http_links_on_the_pages_own_server_become_links_in_node(tmp_path: Path) -> None:
    args = {"hrefs": HREF_CASES, "warns": WARN_CASES, "origin": ORIGIN}
    (tmp_path / "args.json").write_text(json.dumps(args))
    module = (static_dir() / "js" / "safety.js").as_uri()
    script = tmp_path / "run.mjs"
    script.write_text(
        f"import * as m from {json.dumps(module)};\n"
        "import { readFileSync } from 'node:fs';\n"
        f"{JS_RUNNER}\n"
        f"const args = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'args.json'))}));\n"
        "console.log(JSON.stringify(runCases(m, args)));\n"
    )
    out = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    _check(json.loads(out.stdout))


def test_every_link_the_page_builds_from_service_answers_goes_through_safe_href() -> None:
    js = (static_dir() / "js").rglob("*.js")
    for path in js:
        text = path.read_text()
        for field in ("download_url", "artifact_url", "m.url"):
            for line in text.splitlines():
                if field in line and "href" in line:
                    assert "safeHref" in line or "link(" in line, f"{path.name}: {line.strip()}"


# --------------------------------------------------------------------------- in Chromium
class FakeService:
    """mallory's service: the real one's methods, plus link attacks; records its callers."""

    def __init__(self, server_url: str, token: str, real_id: str) -> None:
        self.server_url, self.token, self.real_id = server_url, token, real_id
        self.callers: list[str] = []
        self.service_id = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self) -> None:
        from hypha_rpc import connect_to_server

        server = await connect_to_server({"server_url": self.server_url, "token": self.token})
        real = await server.get_service(self.real_id)
        origin = self.server_url

        def forward(name: str):
            async def call(*args, context=None, **kwargs):
                self.callers.append((context or {}).get("user", {}).get("id", "?"))
                return await real[name](*args, **kwargs)

            return call

        async def list_models_by_dataset(*args, context=None, **kwargs):
            self.callers.append((context or {}).get("user", {}).get("id", "?"))
            return [
                {"id": "js", "name": "js", "created_at": 2, "url": "javascript:alert(1)"},
                {"id": "away", "name": "away", "created_at": 1, "url": "https://evil.example/"},
                {"id": "ok", "name": "ok", "created_at": 0, "url": f"{origin}/ws/artifacts/ok"},
            ]

        names = [k for k in real if callable(real[k]) and not k.startswith("_")]
        api = {n: forward(n) for n in names}
        api["list_models_by_dataset"] = list_models_by_dataset
        info = await server.register_service(
            {
                "id": "cellpose-finetuning",
                "config": {"visibility": "public", "require_context": True},
                **api,
            }
        )
        self.service_id = f"{server.config.workspace}/cellpose-finetuning"
        assert info
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.disconnect()

    def __enter__(self) -> FakeService:
        self._thread.start()
        self._future = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        if not self._ready.wait(60):
            self._future.result(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._future.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.mark.ui
def test_a_foreign_service_is_named_and_its_links_are_not_followed(served, page) -> None:
    from playwright.sync_api import expect

    from tests.web.test_workflow import wait_state

    real_id = "bioimage-io/cellpose-finetuning"
    with FakeService(served.server_url, served.token_for("mallory"), real_id) as fake:
        page.goto(f"{served.page_url}?service={fake.service_id}")
        wait_state(page, "login")
        warning = page.locator("#service-warning")
        expect(warning).to_be_visible()
        expect(warning).to_contain_text(fake.service_id)
        expect(warning).to_contain_text(real_id)
        assert fake.callers == []  # nothing was sent before alice decided
        page.fill("#token", served.token_for("alice"))
        page.click("#login-btn")
        wait_state(page, "connected")
        page.click("[data-tab=export]")
        page.fill("#find-dataset", "ws-user-alice/anything")
        page.click("#find-btn")
        expect(page.locator("#find-table tr")).to_have_count(4)
        hrefs = page.eval_on_selector_all("#find-table a", "as => as.map(a => a.href)")
        assert hrefs == [f"{served.server_url}/ws/artifacts/ok"]
        # the refused targets are shown as plain text, not links
        assert page.eval_on_selector_all(
            "#find-table td span", "ss => ss.map(s => s.textContent)"
        ) == [
            "js",
            "away",
        ]
    # the server's own service: no warning
    page.goto(served.page_url)
    wait_state(page, "login")
    expect(page.locator("#service-warning")).to_be_hidden()


@pytest.mark.ui
def test_safety_js_agrees_in_chromium(browser, page, static_server) -> None:
    base, _ = static_server
    page.goto(f"{base}/app/vendor/README.md")
    js = page.evaluate(
        f"async (args) => {{ {JS_RUNNER}; const m = await import(args.module); "
        "return runCases(m, args); }",
        {
            "hrefs": HREF_CASES,
            "warns": WARN_CASES,
            "origin": ORIGIN,
            "module": f"{base}/app/js/safety.js",
        },
    )
    _check(js)
