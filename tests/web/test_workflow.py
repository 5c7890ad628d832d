"""The whole workflow in the web page, in headless Chromium, against ``serve``.

Log in, upload the dev dataset, train the tiny network for 2 epochs while the
chart updates, segment with the base model and the fine-tuned session side by
side, export and download the package, find it by dataset; then a second user
sees nothing of the first. Plus: the page needs nothing but the local server,
bad uploads are refused before anything is sent, anonymous visitors may only
segment. Every step leaves a screenshot (see conftest.py).
"""

from __future__ import annotations

import asyncio
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from tests.helpers import save_screenshot

pytestmark = pytest.mark.ui

DEV = Path(__file__).parents[1] / "assets" / "dev"
TRAIN_BLUE = (0x1F, 0x6F, 0xEB)
F1_GREEN = (0x1A, 0x7F, 0x37)
# The tiny network trained for two epochs finds objects only at permissive thresholds.
LOOSE = {"flow": "0", "cellprob": "-3"}


def expect():
    from playwright.sync_api import expect as _expect

    return _expect


def wait_state(page, state: str, timeout: float = 30_000) -> None:
    page.wait_for_selector(f"#app-state[data-state={state}]", state="attached", timeout=timeout)


def log_in(page, url: str, token: str | None, state: str = "connected") -> None:
    page.goto(url)
    wait_state(page, "login")
    if token is None:
        page.click("#anon-btn")
    else:
        page.fill("#token", token)
        page.click("#login-btn")
    wait_state(page, state)


def colour_pixels(page, selector: str, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels of a canvas are close to a colour."""
    return page.evaluate(
        """([sel, rgb, tol]) => {
          const c = document.querySelector(sel);
          const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < d.length; i += 4) {
            if (Math.abs(d[i] - rgb[0]) < tol && Math.abs(d[i + 1] - rgb[1]) < tol &&
                Math.abs(d[i + 2] - rgb[2]) < tol) n++;
          }
          return n;
        }""",
        [selector, list(rgb), tol],
    )


def coloured_fraction(page, selector: str) -> float:
    """The share of a canvas's pixels that are not grey (mask overlay colours)."""
    return page.evaluate(
        """(sel) => {
          const c = document.querySelector(sel);
          const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < d.length; i += 4) {
            if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
          }
          return n / (d.length / 4);
        }""",
        selector,
    )


async def _artifacts(server_url: str, token: str) -> list[dict]:
    from hypha_rpc import connect_to_server

    server = await connect_to_server({"server_url": server_url, "token": token})
    try:
        am = await server.get_service("public/artifact-manager")
        staged = await am.list(stage=True)
        committed = await am.list()
        return [*staged, *committed]
    finally:
        await server.disconnect()


def artifacts_of(served, user: str) -> list[dict]:
    """Every artifact (committed or staged) in a user's workspace, seen by that user."""
    token = served.token_for(user)
    # Playwright's sync API keeps an event loop in this thread: use another one
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _artifacts(served.server_url, token)).result(60)


# --------------------------------------------------------------------------- serving
def test_serve_prints_the_page_url_and_config_names_the_service(served, page) -> None:
    assert served.page_url == f"{served.server_url}/cellpose_finetuning/index.html"
    assert re.search(r"^\s+web page\s+: http://127\.0\.0\.1:\d+/", served.output, re.M)
    config = httpx.get(served.page_url.replace("index.html", "config.json"), timeout=10).json()
    assert config["service_id"] == "bioimage-io/cellpose-finetuning"
    assert config["collection"] == "bioimage-io/colab-annotations"
    # the short address works too (the page moves itself to .../index.html)
    page.goto(f"{served.server_url}/cellpose_finetuning")
    wait_state(page, "login")
    assert page.url.endswith("/cellpose_finetuning/index.html")
    assert page.input_value("#service-id") == config["service_id"]
    assert page.inner_text("#server-url") == served.server_url


def test_page_works_with_only_the_local_server_reachable(served, page, page_record) -> None:
    # conftest's route aborts every request that is not to 127.0.0.1/localhost
    log_in(page, served.page_url, served.token_for("dora"))
    assert page_record.blocked == []
    loaded = [u for u in page_record.requests if u.startswith(served.server_url)]
    assert any(u.endswith("/vendor/hypha-rpc/hypha-rpc-websocket.min.mjs") for u in loaded)
    assert any(u.endswith("/js/main.js") for u in loaded)
    assert all(u.startswith(("http://127.0.0.1", "data:", "blob:")) for u in page_record.requests)


# --------------------------------------------------------------------------- the workflow
def test_whole_workflow(served, browser, page, page_record, screenshot_dir, tmp_path) -> None:
    ex = expect()
    shots = screenshot_dir

    # ---- log in
    page.goto(served.page_url)
    wait_state(page, "login")
    page.fill("#token", served.token)  # the one serve printed, for user alice
    save_screenshot(page, shots / "01-login.png", full_page=False)
    page.click("#login-btn")
    wait_state(page, "connected")
    ex(page.locator("#who")).to_contain_text("alice · workspace ws-user-alice")

    # ---- pick the dev folder, see how it pairs, upload
    page.set_input_files("#folder-input", str(DEV))
    ex(page.locator("#pairing-msg")).to_have_text("5 training pairs, 2 test pairs")
    rows = page.locator("#pairing-preview tr")
    ex(rows).to_have_count(8)
    ex(rows.nth(1)).to_contain_text("images/train/bacteria_t15.tif")
    # the pattern form pairs the OME-TIFF copies by the part matched by '*'
    page.fill("#spec-train-images", "images/pattern/*.ome.tif")
    page.fill("#spec-train-annotations", "annotations/pattern/*_mask.ome.tif")
    ex(page.locator("#pairing-msg")).to_have_text("5 training pairs, 2 test pairs")
    ex(rows.nth(1)).to_contain_text("annotations/pattern/t0000_mask.ome.tif")
    ex(rows.nth(1).locator("td").nth(1)).to_have_text("t0000")
    page.fill("#spec-train-annotations", "annotations/train/")
    ex(page.locator("#pairing-msg.error")).to_contain_text(
        "use the same form for train_images and train_annotations"
    )
    page.fill("#spec-train-images", "images/train/")
    ex(page.locator("#pairing-msg")).to_have_text("5 training pairs, 2 test pairs")
    page.fill("#dataset-alias", "dev-data")
    page.click("#upload-btn")
    ex(page.locator("#upload-msg.ok")).to_contain_text("ws-user-alice/dev-data (14 files)")
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 1
    ex(page.locator("#datasets-table tr[data-id='ws-user-alice/dev-data']")).to_have_count(1)
    save_screenshot(page, shots / "02-upload.png")
    uploaded = {a["id"]: a for a in artifacts_of(served, "alice")}
    assert uploaded["ws-user-alice/dev-data"]["file_count"] == 14

    # ---- the training form: defaults, bounds, a bad value refused before sending
    page.click("#datasets-table tr[data-id='ws-user-alice/dev-data'] >> text=Train on it")
    ex(page.locator("#tab-train")).to_be_visible()
    assert page.input_value("#train-images") == "images/train/"
    assert page.input_value("#train-test-annotations") == "annotations/test/"
    assert page.input_value("#param-n_epochs") == "10"
    ex(page.locator("#param-n_epochs ~ .hint")).to_contain_text("≤ 1000")
    page.fill("#param-n_epochs", "5000")
    page.click("#start-btn")
    ex(page.locator("#train-msg.error")).to_contain_text("Nothing was sent")
    ex(page.locator("#param-n_epochs ~ .field-error")).to_have_text("must be ≤ 1000")
    ex(page.locator("#sessions-table")).to_contain_text("No training sessions yet.")
    page.select_option("#train-model", "tiny")
    page.fill("#param-n_epochs", "2")
    page.fill("#param-validation_interval", "1")
    save_screenshot(page, shots / "03-train-form.png", full_page=False)

    # ---- train 2 epochs and watch the chart grow
    page.click("#start-btn")
    ex(page.locator("#train-msg.ok")).to_contain_text("Started session")
    session_id = re.search(r"Started session (\S+)\.", page.inner_text("#train-msg"))[1]
    ex(page.locator("#monitor-id")).to_have_text(session_id)
    page.wait_for_function(
        "Number(document.querySelector('#chart').dataset.trainPoints) >= 1", timeout=240_000
    )
    if page.get_attribute("#chart", "data-train-points") == "1":  # always on a CPU
        assert page.get_attribute("#monitor-state", "data-status") == "running"
        ex(page.locator("#monitor-message")).to_contain_text("Epoch 1/2")
    assert colour_pixels(page, "#chart", TRAIN_BLUE) > 20  # the first point
    page.locator("#monitor").scroll_into_view_if_needed()
    save_screenshot(page, shots / "04-training-epoch1.png", full_page=False)
    page.wait_for_selector(
        "#monitor-state[data-status=completed], #monitor-state[data-status=failed]",
        timeout=300_000,
    )
    assert page.get_attribute("#monitor-state", "data-status") == "completed", page.inner_text(
        "#monitor-message"
    )
    chart = page.locator("#chart")
    assert chart.get_attribute("data-train-points") == "2"
    assert chart.get_attribute("data-test-points") == "2"
    assert chart.get_attribute("data-f1-points") == "2"
    assert colour_pixels(page, "#chart", TRAIN_BLUE) > 300  # a line, not just dots
    assert colour_pixels(page, "#chart", F1_GREEN) > 100
    ex(page.locator("#monitor-message")).to_contain_text("Training completed: 2 epochs")
    ex(page.locator("#monitor-metrics")).to_contain_text("AP@0.5")
    row = page.locator(f"#sessions-table tr[data-session='{session_id}']")
    ex(row).to_have_attribute("data-status", "completed")
    page.locator("#monitor").scroll_into_view_if_needed()
    save_screenshot(page, shots / "05-training-done.png", full_page=False)

    # ---- segment with the base model and the fine-tuned session side by side
    page.click("[data-tab=segment]")
    image = DEV / "images" / "test" / "nuclei_03.tif"
    truth = tifffile.imread(DEV / "annotations" / "test" / "nuclei_03.tif")
    page.set_input_files("#seg-image", str(image))
    page.set_input_files("#seg-mask", str(image.parents[2] / "annotations" / "test" / image.name))
    page.select_option("#seg-model-a", "tiny")
    assert page.input_value("#seg-model-b") == session_id
    page.fill("#seg-flow", LOOSE["flow"])
    page.fill("#seg-cellprob", LOOSE["cellprob"])
    page.click("#seg-run")
    figures = page.locator("#seg-results figure[data-count]")
    ex(figures).to_have_count(3, timeout=180_000)
    ex(page.locator("#seg-msg")).to_be_hidden()
    counts = [int(f.get_attribute("data-count")) for f in figures.all()]
    assert counts[0] == len(np.unique(truth)) - 1 == 29
    assert counts[1] > 0 and counts[2] > 0, counts
    fine_tuned = f"#seg-results figure[data-model='{session_id}']"
    ex(page.locator(f"{fine_tuned} figcaption")).to_contain_text(f"{counts[2]} objects")
    assert coloured_fraction(page, f"{fine_tuned} canvas") > 0.05  # masks drawn over the image
    assert coloured_fraction(page, "#seg-results figure:first-child canvas") > 0.05
    with page.expect_download() as download:
        page.click(f"{fine_tuned} a[download]")
    tif = tmp_path / download.value.suggested_filename
    download.value.save_as(tif)
    masks = tifffile.imread(tif)
    assert tif.name == f"nuclei_03_{session_id}_masks.tif"
    assert masks.dtype == np.uint16 and masks.shape == truth.shape
    assert len(np.unique(masks)) - 1 == counts[2]
    save_screenshot(page, shots / "06-segment.png")

    # ---- export, download the package, find it by dataset
    page.click("[data-tab=train]")
    row.locator("text=Export").click()
    ex(page.locator("#tab-export")).to_be_visible()
    assert page.input_value("#export-session") == session_id
    assert page.input_value("#export-collection") == "bioimage-io/colab-annotations"
    page.fill("#export-name", "alice-dev-model")
    page.fill("#export-flow", LOOSE["flow"])
    page.fill("#export-cellprob", LOOSE["cellprob"])
    page.click("#export-btn")
    ex(page.locator("#export-msg.ok")).to_contain_text(
        "Exported bioimage-io/alice-dev-model", timeout=300_000
    )
    link = page.locator("#export-download")
    assert link.get_attribute("href") == (
        f"{served.server_url}/bioimage-io/artifacts/alice-dev-model/create-zip-file"
    )
    with page.expect_download(timeout=120_000) as download:
        link.click()
    package = tmp_path / "package.zip"
    download.value.save_as(package)
    names = zipfile.ZipFile(package).namelist()
    assert {"rdf.yaml", "model_weights.pth", "model.py", "output_sample.npy"} <= set(names)
    assert page.input_value("#find-dataset") == "ws-user-alice/dev-data"
    page.click("#find-btn")
    ex(page.locator("#find-table tr[data-model='bioimage-io/alice-dev-model']")).to_have_count(1)
    save_screenshot(page, shots / "07-export.png", full_page=False)

    # ---- continue the session for one more epoch, on the same chart
    page.click("[data-tab=train]")
    row.locator("input[type=number]").fill("1")
    row.locator("text=Continue").click()
    page.wait_for_function(
        "document.querySelector('#chart').dataset.trainPoints === '3'", timeout=240_000
    )
    ex(page.locator("#monitor-state")).to_have_attribute("data-status", "completed", timeout=60_000)
    ex(page.locator("#monitor-message")).to_contain_text("3 epochs")

    # ---- stop a run, then delete it
    page.fill("#param-n_epochs", "50")
    page.click("#start-btn")
    ex(page.locator("#train-msg.ok")).to_contain_text("Started session")
    doomed = re.search(r"Started session (\S+)\.", page.inner_text("#train-msg"))[1]
    doomed_row = page.locator(f"#sessions-table tr[data-session='{doomed}']")
    doomed_row.locator("text=Stop").click()
    ex(doomed_row).to_have_attribute("data-status", "stopped", timeout=120_000)
    page.once("dialog", lambda dialog: dialog.accept())
    doomed_row.locator("text=Delete").click()
    ex(doomed_row).to_have_count(0)
    ex(page.locator("#sessions-table tr[data-session]")).to_have_count(1)
    page.click("[data-tab=export]")

    # ---- an error from the service reads as one line, not a traceback
    page.click("#export-btn")
    error = page.locator("#export-msg.error")
    ex(error).to_contain_text(
        "model_name: 'bioimage-io/alice-dev-model' already exists; choose another name"
    )
    assert "Traceback" not in error.inner_text() and 'File "' not in error.inner_text()

    # ---- a second user sees nothing of the first
    page.click("#logout-btn")
    wait_state(page, "login")
    page.fill("#token", served.token_for("bob"))
    page.click("#login-btn")
    wait_state(page, "connected")
    ex(page.locator("#who")).to_contain_text("bob · workspace ws-user-bob")
    ex(page.locator("#datasets-table")).to_contain_text("No datasets yet.")
    page.click("[data-tab=train]")
    ex(page.locator("#sessions-table")).to_contain_text("No training sessions yet.")
    for selector in ("#train-dataset", "#seg-model-b", "#export-session"):
        options = page.locator(f"{selector} option").all_inner_texts()
        assert not any("alice" in o or session_id in o for o in options), (selector, options)
    assert session_id not in page.content() and "dev-data" not in page.content()
    save_screenshot(page, shots / "08-second-user.png", full_page=False)
    assert artifacts_of(served, "bob") == []


# --------------------------------------------------------------------------- bad input
def _bad_folders(root: Path) -> tuple[Path, Path]:
    image = tifffile.imread(DEV / "images" / "train" / "nuclei_00.tif")
    mask = tifffile.imread(DEV / "annotations" / "train" / "nuclei_00.tif")
    missing = root / "missing-mask"
    floats = root / "float-mask"
    for folder in (missing, floats):
        (folder / "images" / "train").mkdir(parents=True)
        (folder / "annotations" / "train").mkdir(parents=True)
        for name in ("a.tif", "b.tif"):
            tifffile.imwrite(folder / "images" / "train" / name, image)
        tifffile.imwrite(folder / "annotations" / "train" / "a.tif", mask)
    tifffile.imwrite(missing / "images" / "train" / "c.tif", image)
    tifffile.imwrite(missing / "annotations" / "train" / "b.tif", mask)
    # a probability map, not labels
    tifffile.imwrite(floats / "annotations" / "train" / "b.tif", (mask > 0).astype(np.float32) / 2)
    return missing, floats


def test_bad_upload_names_the_files_and_sends_nothing(
    served, page, page_record, screenshot_dir, tmp_path
) -> None:
    ex = expect()
    missing, floats = _bad_folders(tmp_path)
    log_in(page, served.page_url, served.token_for("carol"))
    for field in ("#spec-test-images", "#spec-test-annotations"):
        page.fill(field, "")

    # files picked one by one: an image without its mask is named, as the service names it
    page.check("input[name=source][value=files]")
    page.set_input_files("#images-input", [str(p) for p in sorted(missing.glob("images/*/*"))])
    page.set_input_files("#masks-input", [str(p) for p in sorted(missing.glob("annotations/*/*"))])
    ex(page.locator("#pairing-msg.error")).to_have_text(
        "train_images/train_annotations: 1 images in train_images have no annotation in "
        "train_annotations ('masks/'): images/c.tif"
    )
    page.check("input[name=source][value=folder]")
    for field in ("#spec-test-images", "#spec-test-annotations"):
        page.fill(field, "")

    page.set_input_files("#folder-input", str(missing))
    ex(page.locator("#pairing-msg.error")).to_have_text(
        "train_images/train_annotations: 1 images in train_images have no annotation in "
        "train_annotations ('annotations/train/'): images/train/c.tif"
    )
    page.fill("#dataset-alias", "bad-one")
    page.click("#upload-btn")
    ex(page.locator("#upload-msg.error")).to_contain_text("Nothing was uploaded")

    page.set_input_files("#folder-input", str(floats))
    ex(page.locator("#pairing-msg.ok")).to_have_text(
        "2 training pairs, no test pairs (no validation)"
    )
    page.fill("#dataset-alias", "bad-two")
    page.click("#upload-btn")
    box = page.locator("#upload-msg.error")
    ex(box).to_contain_text("1 problem in the masks; nothing was uploaded")
    ex(box.locator("li")).to_have_text(
        [re.compile(r"^annotations/train/b\.tif: mask has non-integer values \(e\.g\. 0\.5\)")]
    )
    save_screenshot(page, screenshot_dir / "09-bad-upload.png", full_page=False)

    ex(page.locator("#datasets-table")).to_contain_text("No datasets yet.")
    assert artifacts_of(served, "carol") == []
    s3 = [u for u in page_record.requests if not u.startswith(served.server_url)]
    assert s3 == [], f"files were sent: {s3}"


def test_anonymous_visitor_may_only_segment_with_cpsam(served, page) -> None:
    ex = expect()
    log_in(page, served.page_url, None, state="anonymous")
    ex(page.locator("#who")).to_contain_text("anonymous")
    ex(page.locator("#tab-segment")).to_be_visible()
    for tab in ("data", "train", "export"):
        ex(page.locator(f"[data-tab={tab}]")).to_be_disabled()
    assert page.locator("#seg-model-a option").all_inner_texts() == ["cpsam"]
    ex(page.locator("#seg-model-b")).to_be_disabled()
    # a bad threshold is refused in the page, before any call
    page.set_input_files("#seg-image", str(DEV / "images" / "test" / "nuclei_03.tif"))
    page.fill("#seg-flow", "-1")
    page.click("#seg-run")
    ex(page.locator("#seg-msg.error")).to_have_text(
        "flow threshold: must be ≥ 0. Nothing was sent."
    )
    ex(page.locator("#seg-results figure")).to_have_count(0)
