"""The page's pairing (js/pairing.js) agrees with the service's (data/pairing.py).

The same cases go through both: the pairs, or the error message, must be
identical. Run in Chromium (``ui``), and in Node.js when it is installed (part
of the default suite, so a change on one side alone is caught without a browser).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from natsort import natsorted

from cellpose_finetuning.data.pairing import pair_files
from cellpose_finetuning.errors import InvalidInput
from cellpose_finetuning.web import static_dir

DEV = Path(__file__).parents[1] / "assets" / "dev"
DEV_NAMES = sorted(p.relative_to(DEV).as_posix() for p in DEV.rglob("*") if p.is_file())
TRAIN = ("images/train/", "annotations/train/")


def _case(images: str, annotations: str, names: list[str], test: bool = False) -> dict:
    case = {"images": images, "annotations": annotations, "names": names}
    if test:
        case.update(images_arg="test_images", annotations_arg="test_annotations")
    return case


many_images = [f"im/cell{i}.tif" for i in range(1, 15)]
CASES = [
    # the dev data, both forms, both splits
    _case(*TRAIN, DEV_NAMES),
    _case("images/test/", "annotations/test/", DEV_NAMES, test=True),
    _case("images/pattern/*.ome.tif", "annotations/pattern/*_mask.ome.tif", DEV_NAMES),
    _case("./images//train/", "annotations/train/", ["/" + n for n in DEV_NAMES]),
    # missing partners, listed (and cut after ten)
    _case(*TRAIN, [n for n in DEV_NAMES if n != "annotations/train/nuclei_01.tif"]),
    _case(*TRAIN, [n for n in DEV_NAMES if n != "images/train/bacteria_t17.tif"]),
    _case("im/", "gt/", [*many_images, "gt/cell1.tif", "gt/other2.tif"]),
    # natural order of keys, big numbers, non-ASCII digits
    _case(
        "im/",
        "gt/",
        [
            f"{d}/{n}"
            for n in ("img10.tif", "img2.tif", "img1.tif", "img10b.tif", "x٣.tif", "x2.tif")
            for d in ("im", "gt")
        ],
    ),
    _case(
        "im/*.tif",
        "gt/*_m.tif",
        [
            "im/a100000000000000000000.tif",
            "im/a99999999999999999999.tif",
            "gt/a100000000000000000000_m.tif",
            "gt/a99999999999999999999_m.tif",
        ],
    ),
    # suffixes: case-insensitive, non-images ignored, subfolders ignored
    _case(
        "im/",
        "gt/",
        [
            *("im/A.TIF", "gt/A.TIF", "im/b.Png", "gt/b.Png", "im/notes.txt", "gt/x.geojson"),
            *("im/sub/c.tif", "gt/sub/d.tif", "im/c.npy", "gt/c.npy", "im/d.jpeg", "gt/d.jpeg"),
        ],
    ),
    # the same folder, overlapping patterns: the more specific one keeps its files
    _case("data/*.tif", "data/*_mask.tif", ["data/a.tif", "data/a_mask.tif", "data/b.tif"]),
    _case("data/*.tif", "data/*_mask.tif", ["data/a.tif", "data/a_mask.tif", "data/b_mask.tif"]),
    _case("data/*.tif", "data/m*tif", ["data/m.tif", "data/x.tif"]),
    # the root folder, and a pattern whose fixed part is the whole name
    _case("./", "masks/", ["a.tif", "b.png", "masks/a.tif", "masks/b.png"]),
    _case("im/*.tif", "gt/*.tif", ["im/.tif", "gt/.tif", "im/x.tif", "gt/x.tif"]),
    # the tools' annotation files: by pattern (also beside the images, as cellpose keeps
    # them), and in the folder form a hint naming the pattern to use
    _case("im/*.tif", "gt/*_seg.npy", ["im/a.1.tif", "im/b.tif", "gt/a.1_seg.npy", "gt/b_seg.npy"]),
    _case("data/*.tif", "data/*_seg.npy", ["data/a.tif", "data/a_seg.npy", "data/a.png"]),
    _case("im/*.png", "gt/*.geojson", ["im/a.png", "im/b.png", "gt/a.geojson", "gt/b.GeoJSON"]),
    _case("im/*.tif", "gt/*_rois.zip", ["im/a.tif", "gt/a_rois.zip", "gt/b_rois.zip"]),
    _case("im/*.tif", "gt/*_cp_masks.png", ["im/a.tif", "gt/a_cp_masks.png", "gt/a.txt"]),
    _case("im/", "gt/", ["im/a.tif", "im/b.tif", "gt/a_seg.npy", "gt/b_seg.npy"]),
    _case("im/", "gt/", ["im/a.ome.tif", "gt/a.geojson", "gt/notes.txt"]),
    _case("./", "gt/", ["a.png", "gt/a_RoiSet.zip"]),
    # spec errors
    _case("images/train", "annotations/train/", DEV_NAMES),
    _case("images/train/", "annotations/*.tif", DEV_NAMES),
    _case("images/train/", "images/train/", DEV_NAMES),
    _case("im/*/*.tif", "gt/*.tif", []),
    _case("im/**.tif", "gt/*.tif", []),
    _case("../images/", "annotations/train/", DEV_NAMES),
    _case("/abs/images/", "annotations/train/", DEV_NAMES),
    _case("s3://bucket/images/", "annotations/train/", DEV_NAMES),
    _case("file:images/", "annotations/train/", DEV_NAMES),
    _case("im\\ages/", "annotations/train/", DEV_NAMES),
    _case("", "annotations/train/", DEV_NAMES),
    _case("images/nothere/", "annotations/train/", DEV_NAMES, test=True),
    _case("images/train/", "annotations/x\u200b/", DEV_NAMES),
    # names that Python's repr quotes differently
    _case("it's/", "gt/", ["it's/a.tif", "gt/b.tif"]),
    _case('say "hi"/', "gt/", ['say "hi"/a.tif', "gt/b.tif"]),
    _case("tab\there/", "gt/", ["gt/a.tif"]),
]

SORTS = [
    ["img10", "img2", "img1", "Img3", "img02b", "a", "", "10", "9x", "x_2_3", "x_2_10"],
    ["b.tif", "a10.tif", "a9.tif", "a٣.tif", "a2.tif", "ä1", "z1"],
]
REPRS = ["plain", "it's", 'say "hi"', "both ' and \"", "back\\slash", "nl\nx", "zw\u200bsp", "é"]


def python_results() -> dict:
    out = []
    for c in CASES:
        try:
            pairs = pair_files(
                c["images"],
                c["annotations"],
                c["names"],
                images_arg=c.get("images_arg", "train_images"),
                annotations_arg=c.get("annotations_arg", "train_annotations"),
            )
        except InvalidInput as exc:
            out.append({"error": str(exc)})
        else:
            out.append({"pairs": [[p.image, p.annotation, p.key] for p in pairs]})
    return {
        "pairs": out,
        "natsorted": [natsorted(s) for s in SORTS],
        "repr": [repr(s) for s in REPRS],
    }


JS_RUNNER = """
async function runCases(m, args) {
  const pairs = args.cases.map((c) => {
    try {
      const got = m.pairFiles(c.images, c.annotations, c.names,
        { imagesArg: c.images_arg, annotationsArg: c.annotations_arg });
      return { pairs: got.map((p) => [p.image, p.annotation, p.key]) };
    } catch (e) {
      return { error: e instanceof m.PairingError ? e.message : `not a PairingError: ${e}` };
    }
  });
  const natsorted = args.sorts.map((s) => m.natsorted(s));
  return { pairs, natsorted, repr: args.reprs.map(m.pyRepr) };
}
"""


def _compare(js: dict, py: dict) -> None:
    assert len(js["pairs"]) == len(CASES)
    for case, got, want in zip(CASES, js["pairs"], py["pairs"], strict=True):
        assert got == want, f"case {case['images']!r} / {case['annotations']!r}"
    assert js["natsorted"] == py["natsorted"]
    assert js["repr"] == py["repr"]


def test_the_cases_cover_both_outcomes() -> None:
    py = python_results()
    errors = [r for r in py["pairs"] if "error" in r]
    assert len(errors) >= 15 and len(py["pairs"]) - len(errors) >= 8
    assert len(py["pairs"][0]["pairs"]) == 5  # the dev training pairs


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_pairing_js_agrees_with_python_in_node(tmp_path: Path) -> None:
    args = {"cases": CASES, "sorts": SORTS, "reprs": REPRS}
    (tmp_path / "args.json").write_text(json.dumps(args))
    module = (static_dir() / "js" / "pairing.js").as_uri()
    script = tmp_path / "run.mjs"
    script.write_text(
        f"import * as m from {json.dumps(module)};\n"
        "import { readFileSync } from 'node:fs';\n"
        f"{JS_RUNNER}\n"
        f"const args = JSON.parse(readFileSync({json.dumps(str(tmp_path / 'args.json'))}));\n"
        "console.log(JSON.stringify(await runCases(m, args)));\n"
    )
    out = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    _compare(json.loads(out.stdout), python_results())


@pytest.mark.ui
def test_pairing_js_agrees_with_python_in_chromium(browser, page, static_server) -> None:
    base, _ = static_server
    page.goto(f"{base}/app/vendor/README.md")  # any same-origin page
    js = page.evaluate(
        f"async (args) => {{ {JS_RUNNER}; "
        "const m = await import(args.module); return runCases(m, args); }",
        {"cases": CASES, "sorts": SORTS, "reprs": REPRS, "module": f"{base}/app/js/pairing.js"},
    )
    _compare(js, python_results())
