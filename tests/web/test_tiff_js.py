"""The page's TIFF reader and writer (js/tiff.js) against tifffile, in Chromium."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.ui

H, W = 29, 37  # odd sizes: partial strips and tiles

rng = np.random.default_rng(0)


def _variants() -> dict[str, tuple[np.ndarray, dict]]:
    u16 = rng.integers(0, 65535, (H, W), dtype=np.uint16)
    labels = (np.arange(H * W).reshape(H, W) // 7).astype(np.uint32) * 1000
    return {
        "uint8-raw": (rng.integers(0, 255, (H, W), dtype=np.uint8), {}),
        "uint16-deflate": (u16, {"compression": "zlib", "rowsperstrip": 8}),
        "uint16-lzw": (u16, {"compression": "lzw", "rowsperstrip": 5}),
        "uint16-packbits": (u16 // 4096, {"compression": "packbits"}),
        "uint16-deflate-predictor": (u16, {"compression": "zlib", "predictor": True}),
        "float32-deflate-fp-predictor": (
            rng.normal(size=(H, W)).astype(np.float32),
            {"compression": "zlib", "predictor": 3},
        ),
        "int16-bigendian-lzw-predictor": (
            rng.integers(-3000, 3000, (H, W), dtype=np.int16),
            {"compression": "lzw", "predictor": True, "byteorder": ">"},
        ),
        "uint16-tiled": (u16, {"compression": "zlib", "tile": (16, 16)}),
        "rgb-uint8": (rng.integers(0, 255, (H, W, 3), dtype=np.uint8), {"photometric": "rgb"}),
        "rgb-uint16-planar": (
            rng.integers(0, 65535, (3, H, W), dtype=np.uint16),
            {"photometric": "rgb", "planarconfig": "separate", "compression": "zlib"},
        ),
        "bigtiff-uint16": (u16, {"bigtiff": True}),
        "pages-uint16": (rng.integers(0, 65535, (3, H, W), dtype=np.uint16), {}),
        "uint32-labels": (labels, {"compression": "zlib"}),
        "float64": (rng.normal(size=(H, W)), {}),
        "bool": (rng.integers(0, 2, (H, W)).astype(bool), {}),
    }


def _write(path, data: np.ndarray, options: dict) -> None:
    options = dict(options)
    if data.ndim == 3 and "photometric" not in options and "planarconfig" not in options:
        with tifffile.TiffWriter(path) as tif:  # one page per plane
            for plane in data:
                tif.write(plane, photometric="minisblack")
        return
    options.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **options)


JS_DECODE = """async (args) => {
  const m = await import(args.module);
  const out = {};
  for (const name of args.names) {
    const buffer = await (await fetch(`${args.base}/scratch/${name}.tif`)).arrayBuffer();
    const tiff = m.parseTiff(buffer);
    const pages = [];
    for (let i = 0; i < tiff.pages.length; i++) {
      const p = await m.decodePage(buffer, tiff, i);
      pages.push({ shape: [p.height, p.width, p.samples], dtype: p.dtype,
        values: Array.from(p.data, (v) => (Number.isNaN(v) ? "nan" : Number(v))) });
    }
    out[name] = pages;
  }
  const labels = Uint16Array.from({ length: 6 * 5 }, (_, i) => (i * 977) % 65536);
  out.__written__ = Array.from(m.encodeLabelTiff(labels, 5, 6));
  return out;
}"""


def test_tiff_reader_matches_tifffile(page, static_server) -> None:
    base, scratch = static_server
    variants = _variants()
    for name, (data, options) in variants.items():
        _write(scratch / f"{name}.tif", data, options)
    page.goto(f"{base}/app/vendor/README.md")
    got = page.evaluate(
        JS_DECODE, {"module": f"{base}/app/js/tiff.js", "names": list(variants), "base": base}
    )
    for name, (data, options) in variants.items():
        pages = got[name]
        if options.get("planarconfig") == "separate" or options.get("photometric") == "rgb":
            expected = np.moveaxis(data, 0, -1) if data.shape[0] == 3 else data
            assert len(pages) == 1, name
            js = np.array(pages[0]["values"]).reshape(pages[0]["shape"])
            np.testing.assert_array_equal(js, expected, err_msg=name)
            continue
        planes = data if data.ndim == 3 else data[None]
        assert len(pages) == len(planes), name
        for page_js, plane in zip(pages, planes, strict=True):
            assert page_js["shape"] == [H, W, 1], name
            want = "bool" if plane.dtype == bool else str(plane.dtype)
            assert page_js["dtype"] == want, name
            js = np.array(page_js["values"]).reshape(H, W)
            np.testing.assert_array_equal(js, plane.astype(js.dtype), err_msg=name)


def test_tiff_writer_is_read_by_tifffile(page, static_server) -> None:
    base, scratch = static_server
    _write(scratch / "uint8-raw.tif", np.zeros((H, W), np.uint8), {})
    page.goto(f"{base}/app/vendor/README.md")
    got = page.evaluate(
        JS_DECODE, {"module": f"{base}/app/js/tiff.js", "names": ["uint8-raw"], "base": base}
    )
    written = tifffile.imread(io.BytesIO(bytes(got["__written__"])))
    expected = ((np.arange(30) * 977) % 65536).astype(np.uint16).reshape(6, 5)
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, expected)
