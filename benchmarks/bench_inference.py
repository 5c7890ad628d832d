"""Case 2: inference overhead: our ``segment()`` against ``CellposeModel.eval`` by hand.

The image is a real one, the dev nuclei image ``nuclei_03.tif`` mirrored and
tiled up to 512², 2048² and 4096² (float32, :func:`common.dev_image`), plus
the dev 3D stack (31×61×57, ``do_3D=True``). The network is the ``tiny``
preset trained on synthetic cells (:func:`fixtures.cells_model`), so the
mask step has real work to do, run on the CPU in float32 with
:data:`common.THREADS` torch threads.

- **Ours**: the model from :class:`ModelCache` (the service's path), then
  ``segment(model, image[None])`` with the default :class:`InferenceSettings`.
- **Reference**: the same network wrapped by ``wrap_network`` (a
  ``CellposeModel``), then ``model.eval(image)`` with cellpose's defaults.

Each (image, side) runs in its own subprocess, so each peak RSS is its own.
The two processes of an image are alive together and take turns, one call
each, so drifting machine load hits both alike; each makes one untimed
warm-up call on a 256² crop first. Before the last timed call the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``), which gives the peak
of one call; the memory check at 4096² compares that peak, above the RSS
after importing torch and cellpose, with 2 × (image bytes + model bytes).

Run as a script, this module is one such subprocess: ``python
benchmarks/bench_inference.py '<json config>'``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DEV_DATA,
    MIB,
    THREADS,
    CaseResult,
    Context,
    LineWorker,
    Row,
    Target,
    dev_image,
    emit,
    peak_rss_bytes,
    peak_rss_now_bytes,
    profile_call,
    profile_difference,
    reset_peak_rss,
    rss_bytes,
    serve_commands,
    set_torch_threads,
    summarize,
)
from fixtures import cells_model

TITLE = "Inference overhead"
STACK = DEV_DATA / "images" / "3d" / "nuclei3d.tif"


def worker(cfg: dict[str, Any]) -> None:
    """Load the model one way; segment the image each time the driver says ``run``."""
    import numpy as np
    import torch
    from cellpose import models  # noqa: F401 - part of the baseline on both sides

    set_torch_threads()
    baseline = rss_bytes()
    model_bytes = Path(cfg["model"]).stat().st_size
    if cfg["side"] == "ours":
        from cellpose_finetuning.engine.inference import ModelCache, ModelRef, segment
        from cellpose_finetuning.engine.schemas import InferenceSettings

        model = ModelCache(device=cfg["device"]).get(ModelRef("bench", cfg["model"], "checkpoint"))
        settings = InferenceSettings(do_3D=cfg["kind"] == "3d")

        def run(img: np.ndarray) -> np.ndarray:
            # Canonical axes: (C, H, W) or (Z, C, H, W).
            return segment(model, img[None] if img.ndim == 2 else img[:, None], settings)

    else:
        from cellpose_finetuning.engine.models import load_network, wrap_network

        net, _ = load_network(cfg["model"], dtype=torch.float32)
        model = wrap_network(net, torch.device(cfg["device"]), cfg["model"])

        def run(img: np.ndarray) -> np.ndarray:
            if img.ndim == 3:
                return model.eval(img, do_3D=True, z_axis=0)[0]
            return model.eval(img)[0]

    if cfg["kind"] == "3d":
        import tifffile

        image = tifffile.imread(STACK).astype("float32")
        warm = image[:, :32, :32]
    else:
        image = dev_image(cfg["size"])
        warm = image[:256, :256].copy()
    run(warm)
    state: dict[str, Any] = {"calls": 0}

    def run_once() -> dict[str, Any]:
        state.pop("masks", None)
        state["calls"] += 1
        before = rss_bytes()
        reset = state["calls"] == cfg["reps"] and reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        masks = run(image)
        t, cpu = time.perf_counter() - t0, time.process_time() - c0
        if reset:
            state["call_peak"] = peak_rss_now_bytes()
            state["before_call"] = before
        state["masks"] = masks
        return {"time": t, "cpu": cpu}

    def profile() -> dict[str, Any]:
        _, prof = profile_call(lambda: run(image))
        return {"profile": prof}

    def done() -> dict[str, Any]:
        masks = np.asarray(state["masks"])
        return {
            "baseline_rss": baseline,
            "model_bytes": model_bytes,
            "peak_rss": peak_rss_bytes(),
            "call_peak_rss": state.get("call_peak"),
            "rss_before_call": state.get("before_call"),
            "image_bytes": image.nbytes,
            "shape": list(image.shape),
            "n_masks": int(masks.max()),
            "masks_dtype": str(masks.dtype),
            "masks_sha": hashlib.sha1(
                np.ascontiguousarray(masks.astype("uint32")).data
            ).hexdigest(),
        }

    emit({"ready": True})
    serve_commands({"run": run_once, "profile": profile, "done": done})


def measure_pair(
    ctx: Context,
    kind: str,
    size: int,
    reps: int,
    model: Path,
    first: str,
    *,
    profile: bool = False,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Ours and the reference, each in its own process, taking turns ``reps`` times."""
    workers: dict[str, LineWorker] = {}
    try:
        for side in ("ours", "ref"):
            cfg = {
                "side": side,
                "kind": kind,
                "size": size,
                "model": str(model),
                "device": device,
                "reps": reps,
            }
            workers[side] = LineWorker(
                [str(Path(__file__)), json.dumps(cfg)],
                ctx.log_path(f"inference-{kind}-{size}-{side}"),
            )
        for w in workers.values():
            w.read(timeout=600)  # ready: imports, model, image, warm-up done
        order = (first, "ref" if first == "ours" else "ours")
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        cpu: dict[str, list[float]] = {"ours": [], "ref": []}
        for rep in range(reps):
            for side in order if rep % 2 == 0 else order[::-1]:
                answer = workers[side].ask("run", timeout=1200)
                times[side].append(answer["time"])
                cpu[side].append(answer["cpu"])
        results: dict[str, dict[str, Any]] = {
            side: {"times": times[side], "cpu": cpu[side]} for side in workers
        }
        if profile:  # before "done", which ends the worker
            for side, w in workers.items():
                results[side]["profile"] = w.ask("profile", timeout=1200)["profile"]
        for side, w in workers.items():
            results[side].update(w.ask("done", timeout=120))
    finally:
        for w in workers.values():
            w.close()
    for side in ("ours", "ref"):
        r = results[side]
        ctx.log(
            f"  {kind} {size or ''} {side}: median {summarize(r['times']).median:.3f} s of "
            f"{reps}, peak RSS {r['peak_rss'] / MIB:.0f} MiB, {r['n_masks']} objects"
        )
    return results


def plan(quick: bool) -> list[tuple[str, int, int]]:
    """(kind, size, repetitions) to measure."""
    if quick:
        return [("2d", 512, 2), ("2d", 1024, 1), ("3d", 0, 1)]
    return [("2d", 512, 5), ("2d", 2048, 3), ("2d", 4096, 1), ("3d", 0, 2)]


def run(ctx: Context) -> CaseResult:
    """Measure every planned image on the CPU."""
    model = cells_model(ctx)
    case = CaseResult(
        id="inference",
        title=TITLE,
        ours_label="`ModelCache().get(...)` then `engine.inference.segment(model, image[None])`, "
        f"float32 on the CPU, {THREADS} torch threads",
        reference_label="the same network, `wrap_network(load_network(checkpoint))` (a "
        "`CellposeModel`), then `model.eval(image)` with cellpose's defaults, "
        f"{THREADS} torch threads",
    )
    raw: dict[str, Any] = {}
    largest = max(s for k, s, _ in plan(ctx.quick) if k == "2d")
    for i, (kind, size, reps) in enumerate(plan(ctx.quick)):
        first = "ours" if i % 2 == 0 else "ref"  # neither side always starts
        res = measure_pair(ctx, kind, size, reps, model, first)
        ours, ref = res["ours"], res["ref"]
        shape = "×".join(str(x) for x in ours["shape"])
        label = f"{size}² 2D" if kind == "2d" else f"3D stack {shape}, do_3D"
        raw[label] = res
        same = ours["masks_sha"] == ref["masks_sha"]
        row = Row(
            f"{label}: time per image",
            "s",
            summarize(ours["times"]),
            summarize(ref["times"]),
            Target("max_ratio", 1.10),
            note=f"{ours['n_masks']} objects; masks identical to cellpose's: "
            f"{'yes' if same else 'NO'}",
        )
        case.rows.append(row)
        case.rows.append(
            Row(
                f"{label}: CPU time per image (user + system, all threads)",
                "s",
                summarize(ours["cpu"]),
                summarize(ref["cpu"]),
            )
        )
        case.rows.append(
            Row(
                f"{label}: peak RSS of the process",
                "MiB",
                summarize([ours["peak_rss"] / MIB]),
                summarize([ref["peak_rss"] / MIB]),
            )
        )
        if kind == "2d" and size == largest and ours["call_peak_rss"]:
            budget = 2 * (ours["image_bytes"] + ours["model_bytes"])

            def mib(side: str, key: str, base: str, res: dict = res) -> Any:
                return summarize([(res[side][key] - res[side][base]) / MIB])

            case.rows += [
                Row(
                    f"{label}: peak RSS of one call above the post-import RSS",
                    "MiB",
                    mib("ours", "call_peak_rss", "baseline_rss"),
                    mib("ref", "call_peak_rss", "baseline_rss"),
                    Target("max_value", budget / MIB),
                    note=f"target = 2 × (float32 image {ours['image_bytes'] / MIB:.0f} MiB + "
                    f"model file {ours['model_bytes'] / MIB:.1f} MiB); post-import RSS (torch "
                    f"and cellpose imported, no model, no image) "
                    f"{ours['baseline_rss'] / MIB:.0f} MiB",
                ),
                Row(
                    f"{label}: … of which held before the call (model, image, warm-up)",
                    "MiB",
                    mib("ours", "rss_before_call", "baseline_rss"),
                    mib("ref", "rss_before_call", "baseline_rss"),
                ),
                Row(
                    f"{label}: … of which the call's own working memory",
                    "MiB",
                    mib("ours", "call_peak_rss", "rss_before_call"),
                    mib("ref", "call_peak_rss", "rss_before_call"),
                ),
            ]
        if row.met is False and not case.profiles:
            # One profile per case is enough (the code path is the same at every
            # size), and at most 2048², where it takes seconds rather than minutes.
            psize = min(size, 2048)
            plabel = label if psize == size else f"{psize}² 2D"
            prof = measure_pair(ctx, kind, psize, 1, model, first, profile=True)
            for side, name in (("ours", "segment()"), ("ref", "CellposeModel.eval")):
                case.profiles.append({"label": f"{plabel}, {name}", **prof[side]["profile"]})
            case.notes.append(
                f"{label} missed its target; {plabel} profiled once more each: "
                + profile_difference(prof["ours"]["profile"], prof["ref"]["profile"])
                + "."
            )
    case.notes += _notes(case.rows, largest)
    case.details = {"runs": raw, "model": "tiny preset trained on synthetic cells (fixtures.py)"}
    return case


def _tiles(size: int, bsize: int = 256, overlap: float = 0.1) -> int:
    """Tiles cellpose's ``run_net`` makes of a size² image (its own formula)."""
    import math

    padded = -(-size // 16) * 16 + 16  # get_pad_yx: up to a multiple of 16, then 8 px a side
    per_axis = 1 if padded <= bsize else math.ceil((1 + 2 * overlap) * padded / bsize)
    return per_axis * per_axis


def _notes(rows: list[Row], largest: int) -> list[str]:
    notes = []
    by_name = {r.name.split(": ", 1)[-1]: r for r in rows if r.name.startswith(f"{largest}²")}
    total = by_name.get("peak RSS of one call above the post-import RSS")
    work = by_name.get("… of which the call's own working memory")
    if total and total.met is False and total.reference and work and work.ours:
        n = _tiles(largest)
        tiles_mib = n * 3 * 256 * 256 * 4 / MIB
        flows_mib = 3 * largest * largest * 4 / MIB
        notes.append(
            f"Memory at {largest}²: the reference, cellpose's own `eval`, needs "
            f"{total.reference.median:,.0f} MiB above the post-import RSS for the same call, "
            f"ours {total.ours.median if total.ours else 0:,.0f} MiB, so what exceeds the "
            "target is cellpose's, not ours (`segment` passes the float32 image through and "
            "converts the labels without a copy when they fit). In cellpose, "
            f"`core.run_net` holds all {n} tiles of 3×256×256 float32 at once "
            f"({tiles_mib:,.0f} MiB, plus `make_tiles`' own copy), the network output of "
            f"every tile (another {tiles_mib:,.0f} MiB) and the averaged flows and cell "
            f"probability ({flows_mib:,.0f} MiB), about "
            f"{3 * tiles_mib + flows_mib:,.0f} MiB of the call's "
            f"{work.ours.median:,.0f} MiB working memory; the mask step "
            "(`dynamics.compute_masks`) adds its own arrays after that."
        )
    return notes


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
