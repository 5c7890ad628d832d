"""Case: whole-slide images in bounded memory (#22): block-wise segmentation against ``eval``.

- **4096²** (the dev nuclei image ``nuclei_03.tif`` mirrored and tiled,
  float32, :func:`common.dev_image`): ours is
  ``engine.blockwise.segment_blockwise`` with the block size it chooses from
  the available memory; the reference is cellpose's ``CellposeModel.eval`` on
  the same network and image. Each side runs in a subprocess of its own: it
  imports torch and cellpose, records that RSS (the baseline), loads the
  network and the image, segments a 256² crop once (warm-up), resets the
  kernel's peak-RSS counter and segments the image once, timed. Working
  memory = that call's peak RSS above the baseline. AP@0.5 of ours against
  eval's masks (cellpose's ``metrics.average_precision``).
- **Whole slide** (16384², or 8192² when ``BENCH_WSI_SIDE`` says so; skipped
  with ``--quick``): the dev nuclei tiled with Gaussian noise, written to an
  uncompressed uint16 TIFF by a subprocess, then segmented from that path
  into a BigTIFF of labels by ``segment_blockwise``; peak RSS of the whole
  process (target 3 GiB), wall time and objects. No reference: ``eval``
  would need tens of GiB.

The network is the ``tiny`` preset trained on synthetic cells
(:func:`fixtures.cells_model`), float32 on the CPU, :data:`common.THREADS`
torch threads. Run as a script, this module is one subprocess: ``python
benchmarks/bench_wsi.py '<json config>'``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DEV_IMAGE,
    MIB,
    THREADS,
    CaseResult,
    Context,
    Row,
    Target,
    dev_image,
    emit,
    peak_rss_bytes,
    peak_rss_now_bytes,
    reset_peak_rss,
    rss_bytes,
    run_python,
    set_torch_threads,
    summarize,
)
from fixtures import cells_model

TITLE = "Whole-slide images: block-wise segmentation in bounded memory"
GIB = 1024**3
#: Side of the whole-slide case (16384 by default; 8192 on a slow machine).
SLIDE_SIDE = int(os.environ.get("BENCH_WSI_SIDE", "16384"))
#: Side of the image compared with eval (4096; ``--quick`` 2048) and its block size
#: (default: chosen from the available memory), for slow machines.
COMPARE_SIDE = int(os.environ.get("BENCH_WSI_SIZE", "0"))
COMPARE_BLOCK = int(os.environ.get("BENCH_WSI_BLOCK", "0")) or None


def make_slide(path: Path, side: int, seed: int = 0) -> dict[str, Any]:
    """The dev nuclei tiled to ``side``², noise added, as an uncompressed uint16 TIFF.

    Written in bands of 1024 rows through ``tifffile.memmap``, so this never
    holds the slide either.
    """
    import numpy as np
    import tifffile

    quad = dev_image(1024, DEV_IMAGE)  # seamless 1024² pattern
    scale = 60000.0 / float(quad.max())
    rng = np.random.default_rng(seed)
    out = tifffile.memmap(path, shape=(side, side), dtype="uint16", bigtiff=True)
    reps = side // 1024
    for r in range(reps):
        band = np.tile(quad, (1, reps)) * scale
        band += rng.normal(0.0, 0.03 * 60000.0, band.shape).astype("float32")
        out[r * 1024 : (r + 1) * 1024] = np.clip(band, 0, 65535).astype("uint16")
        out.flush()
    del out
    return {"path": str(path), "side": side, "bytes": path.stat().st_size}


def worker(cfg: dict[str, Any]) -> None:
    """One side of one case; prints one JSON line."""
    import numpy as np
    import torch
    from cellpose import models  # noqa: F401 - part of the baseline on both sides

    set_torch_threads()
    if cfg["side"] == "make_slide":
        emit(make_slide(Path(cfg["path"]), cfg["size"]))
        return
    baseline = rss_bytes()
    if cfg["side"] == "eval":
        from cellpose_finetuning.engine.models import load_network, wrap_network

        net, _ = load_network(cfg["model"], dtype=torch.float32)
        model = wrap_network(net, torch.device("cpu"), cfg["model"])

        def run(img: Any) -> Any:
            return model.eval(img)[0]

    else:
        from cellpose_finetuning.engine.blockwise import segment_blockwise
        from cellpose_finetuning.engine.inference import ModelCache, ModelRef

        model = ModelCache().get(ModelRef("bench", cfg["model"], "checkpoint"))

        def run(img: Any) -> Any:
            out = cfg.get("out") if isinstance(img, str) else None
            return segment_blockwise(model, img, block_size=cfg.get("block_size"), out=out)

    if cfg["kind"] == "slide":
        image: Any = cfg["path"]
        warm = dev_image(256)
    else:
        image = dev_image(cfg["size"])
        warm = image[:256, :256].copy()
    run(warm)
    before = rss_bytes()
    reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(image)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    call_peak = peak_rss_now_bytes() if reset else None
    info: dict[str, Any] = {
        "time": seconds,
        "cpu": cpu,
        "baseline_rss": baseline,
        "rss_before_call": before,
        "call_peak_rss": call_peak,
        "peak_rss": peak_rss_bytes(),
    }
    if cfg["side"] == "eval":
        masks = np.asarray(result)
        np.save(cfg["masks"], masks)
        info["n_objects"] = int(masks.max())
    else:
        info.update(
            n_objects=result.n_objects,
            block_size=result.block_size,
            overlap=result.overlap,
            n_blocks=result.n_blocks,
            n_tiles=result.n_tiles,
            truncated=result.truncated,
        )
        if cfg.get("reference"):
            from cellpose.metrics import average_precision

            ref = np.load(cfg["reference"]).astype("int32")
            ours = np.asarray(result.masks).astype("int32")
            ap, tp, fp, fn = average_precision(ref, ours, threshold=[0.5, 0.75, 0.9])
            info.update(ap=[float(a) for a in ap], tp=int(tp[0]), fp=int(fp[0]), fn=int(fn[0]))
            info["identical"] = bool(np.array_equal(ref > 0, ours > 0)) and int(tp[2]) == int(
                ref.max()
            )
    emit(info)


def _side(ctx: Context, cfg: dict[str, Any], name: str) -> dict[str, Any]:
    result, wall = run_python(
        [str(Path(__file__)), json.dumps(cfg)], timeout=3600, log_path=ctx.log_path(name)
    )
    result["wall"] = wall
    return result


def run(ctx: Context) -> CaseResult:
    """4096² against eval; then the whole slide (not with --quick)."""
    model = cells_model(ctx)
    size = COMPARE_SIDE or (2048 if ctx.quick else 4096)
    case = CaseResult(
        id="wsi",
        title=TITLE,
        ours_label="`engine.blockwise.segment_blockwise(model, image)`: blocks chosen from the "
        "available memory (at most 1024² cores, 64 px overlap), cellpose's own tile grid and "
        f"mask step per block, float32 on the CPU, {THREADS} torch threads",
        reference_label="the same network as a `CellposeModel`, `model.eval(image)` with "
        f"cellpose's defaults, {THREADS} torch threads",
    )
    ref_masks = ctx.work_dir / f"eval-{size}.npy"
    common_cfg = {"kind": "image", "size": size, "model": str(model), "block_size": COMPARE_BLOCK}
    ref = _side(ctx, {**common_cfg, "side": "eval", "masks": str(ref_masks)}, f"wsi-{size}-eval")
    ours = _side(
        ctx, {**common_cfg, "side": "blockwise", "reference": str(ref_masks)}, f"wsi-{size}-ours"
    )
    ref_masks.unlink(missing_ok=True)
    ctx.log(
        f"  {size}²: blockwise {ours['time']:.1f} s, eval {ref['time']:.1f} s; working memory "
        f"{(ours['call_peak_rss'] - ours['baseline_rss']) / MIB:.0f} vs "
        f"{(ref['call_peak_rss'] - ref['baseline_rss']) / MIB:.0f} MiB; AP@0.5 {ours['ap'][0]:.4f}"
    )
    label = f"{size}² 2D"

    def mib(r: dict[str, Any], key: str, base: str) -> Any:
        return summarize([(r[key] - r[base]) / MIB])

    case.rows += [
        Row(
            f"{label}: peak RSS of the call above the post-import RSS (working memory)",
            "MiB",
            mib(ours, "call_peak_rss", "baseline_rss"),
            mib(ref, "call_peak_rss", "baseline_rss"),
            Target("max_ratio", 0.5),
            note=f"blocks of {ours['block_size']}² + {ours['overlap']} px overlap, "
            f"{ours['n_blocks']} blocks, {ours['n_tiles']} tiles (each run once); post-import "
            f"RSS {ours['baseline_rss'] / MIB:.0f} MiB",
        ),
        Row(
            f"{label}: … of which the call's own (above model, image and warm-up)",
            "MiB",
            mib(ours, "call_peak_rss", "rss_before_call"),
            mib(ref, "call_peak_rss", "rss_before_call"),
        ),
        Row(
            f"{label}: time per image",
            "s",
            summarize([ours["time"]]),
            summarize([ref["time"]]),
            Target("max_ratio", 1.10),
            note=f"{ours['n_objects']} objects (eval {ref['n_objects']}); CPU "
            f"{ours['cpu']:.1f} s vs {ref['cpu']:.1f} s",
        ),
        Row(
            f"{label}: AP@0.5 of block-wise masks against eval's",
            "",
            summarize([ours["ap"][0]]),
            note=f"AP@0.75 {ours['ap'][1]:.4f}, AP@0.9 {ours['ap'][2]:.4f}; TP {ours['tp']}, "
            f"FP {ours['fp']}, FN {ours['fn']}; objects cut by the overlap: {ours['truncated']}",
        ),
    ]
    case.details = {"image": {"ours": ours, "reference": ref}}
    if ctx.quick or not SLIDE_SIDE:
        case.notes.append(f"{'--quick' if ctx.quick else 'BENCH_WSI_SIDE=0'}: no whole-slide case.")
        return case
    side = SLIDE_SIDE
    slide = ctx.work_dir / f"slide-{side}.tif"
    made = _side(ctx, {"side": "make_slide", "size": side, "path": str(slide)}, "wsi-make")
    try:
        big = _side(
            ctx,
            {
                "side": "blockwise",
                "kind": "slide",
                "model": str(model),
                "path": str(slide),
                "out": str(ctx.work_dir / f"slide-{side}-masks.tif"),
            },
            f"wsi-{side}",
        )
    finally:
        slide.unlink(missing_ok=True)
        (ctx.work_dir / f"slide-{side}-masks.tif").unlink(missing_ok=True)
    ctx.log(
        f"  {side}² slide: {big['time']:.0f} s, peak RSS {big['peak_rss'] / MIB:.0f} MiB, "
        f"{big['n_objects']} objects"
    )
    case.rows += [
        Row(
            f"{side}² slide from a TIFF on disk: peak RSS of the process",
            "MiB",
            summarize([big["peak_rss"] / MIB]),
            target=Target("max_value", 3 * GIB / MIB),
            note=f"uint16 TIFF of {made['bytes'] / MIB:,.0f} MiB in, uint32 BigTIFF of labels out; "
            f"blocks of {big['block_size']}², {big['n_blocks']} blocks, {big['n_tiles']} tiles; "
            f"post-import RSS {big['baseline_rss'] / MIB:.0f} MiB",
        ),
        Row(f"{side}² slide: wall time of the call", "s", summarize([big["time"]])),
        Row(
            f"{side}² slide: objects",
            "",
            summarize([big["n_objects"]]),
            note=f"objects cut by the overlap: {big['truncated']}",
        ),
    ]
    case.details["slide"] = big
    return case


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
