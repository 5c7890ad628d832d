"""Write the dev annotations in the tools' own formats, with the tools' own libraries.

    PYTHONPATH=src python tests/assets/make_formats.py

From ``dev/annotations/{train,test}/*.tif`` it writes, under ``formats/``:

- ``png/<split>/<stem>_cp_masks.png``: 16-bit label PNGs by cellpose's ``io.save_masks``;
- ``geojson/<split>/<stem>.geojson``: QuPath-style FeatureCollections of detections;
- ``rois/<split>/<stem>_rois.zip``: ImageJ ROI sets by ``roifile``;
- ``seg.zip``: ``seg/<split>/<stem>_seg.npy`` by cellpose's ``io.masks_flows_to_seg``,
  stored deflated (each file is mostly its zero flows: ~1.5 MB raw, a few kB packed).

The test fixtures unpack ``seg.zip`` as it is: the bytes they read are cellpose's.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import tifffile

from cellpose_finetuning.io.annotations import write_outputs

HERE = Path(__file__).parent
DEV = HERE / "dev"
OUT = HERE / "formats"


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        seg_root = Path(tmp)
        for split in ("train", "test"):
            for mask_path in sorted((DEV / "annotations" / split).glob("*.tif")):
                masks = tifffile.imread(mask_path)
                image = tifffile.imread(DEV / "images" / split / mask_path.name)
                name = mask_path.name
                write_outputs(OUT / "png" / split, name, masks, ["png"])
                write_outputs(OUT / "geojson" / split, name, masks, ["geojson"])
                write_outputs(OUT / "rois" / split, name, masks, ["rois"])
                write_outputs(seg_root / "seg" / split, name, masks, ["seg"], image=image)
        with zipfile.ZipFile(OUT / "seg.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for path in sorted(seg_root.rglob("*_seg.npy")):
                zf.write(path, path.relative_to(seg_root).as_posix())
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
