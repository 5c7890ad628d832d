"""Models the cases share: untrained preset checkpoints and a tiny network that finds cells.

An untrained network predicts no cells, so cellpose's mask step would do
almost nothing and inference would be measured on an unrealistic load. The
``cells`` model is the ``tiny`` preset trained for 40 epochs on synthetic
disks (:func:`common.synthetic_cells`); on the real dev nuclei that the
cases tile up it finds roughly a third of the nuclei, enough to give the
mask step real work. It is built once, in a subprocess, and cached under
``benchmarks/.work/cache`` keyed by its recipe and the cellpose version;
the report gives the time it took when it was built in that run.

Run as a script, this module builds one checkpoint:
``python benchmarks/fixtures.py preset tiny OUT.pth`` or ``... cells OUT.pth``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from common import BENCH_DIR, Context, emit, run_python, set_torch_threads, synthetic_cells

CACHE_DIR = BENCH_DIR / ".work" / "cache"
CELLS_RECIPE = (
    "tiny; seed 0; 8 synthetic 256x256 images seeds 0-7 spacing 28; 40 epochs lr 3e-3 bs 8 wd 1e-4"
)


def _key(recipe: str) -> str:
    from importlib.metadata import version

    return hashlib.sha256(f"{recipe}|cellpose {version('cellpose')}".encode()).hexdigest()[:10]


#: Seconds spent building fixtures in this run, by name (0 when taken from the cache).
BUILT: dict[str, float] = {}


def preset_checkpoint(ctx: Context, preset: str) -> Path:
    """An untrained ``preset`` network (torch seed 0) as one of our checkpoints."""
    path = CACHE_DIR / f"{preset}-seed0-{_key(preset)}.pth"
    if not path.is_file():
        _, wall = run_python(
            [str(Path(__file__)), "preset", preset, str(path)],
            timeout=300,
            log_path=ctx.log_path("fixtures"),
        )
        BUILT[preset] = wall
    return path


def cells_model(ctx: Context) -> Path:
    """The tiny network trained on synthetic cells (built once, then cached)."""
    path = CACHE_DIR / f"cells-{_key(CELLS_RECIPE)}.pth"
    if not path.is_file():
        ctx.log("  building the benchmark model (tiny, trained 40 epochs on synthetic cells)...")
        _, wall = run_python(
            [str(Path(__file__)), "cells", str(path)],
            timeout=900,
            log_path=ctx.log_path("fixtures"),
        )
        BUILT["cells"] = wall
    return path


def _build_preset(preset: str, out: Path) -> dict:
    import torch

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

    torch.manual_seed(0)
    net = build_network(PRESETS[preset])
    save_network(net, PRESETS[preset], out)
    return {"path": str(out), "params": sum(p.numel() for p in net.parameters())}


def _build_cells(out: Path) -> dict:
    import tempfile

    import torch
    from cellpose import train

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network

    set_torch_threads()
    data = [synthetic_cells(256, seed=i, spacing=28) for i in range(8)]
    torch.manual_seed(0)
    net = build_network(PRESETS["tiny"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, losses, _ = train.train_seg(
            net,
            train_data=[img for img, _ in data],
            train_labels=[lbl for _, lbl in data],
            n_epochs=40,
            learning_rate=3e-3,
            weight_decay=1e-4,
            batch_size=8,
            min_train_masks=1,
            save_path=tmp,
            model_name="cells",
        )
    save_network(net, PRESETS["tiny"], out)
    return {"path": str(out), "train_s": time.perf_counter() - t0, "final_loss": losses[-1]}


if __name__ == "__main__":
    mode = sys.argv[1]
    target = Path(sys.argv[-1])
    target.parent.mkdir(parents=True, exist_ok=True)
    emit(_build_preset(sys.argv[2], target) if mode == "preset" else _build_cells(target))
