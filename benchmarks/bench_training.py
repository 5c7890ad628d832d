"""Case 1: training overhead: our runner against ``cellpose.train.train_seg`` by hand.

Every run is a fresh Python process that trains on the dev images (5
training pairs; 2 test pairs with validation) and exits. All sides use the
same network file (an untrained preset written by ``build_network``), seed,
epochs, batch size, learning rate, weight decay and schedule (our
``lr_schedule="cellpose"`` is ``train_seg``'s own), and :data:`common.THREADS`
torch threads.

- **reference**: a script that reads the images with tifffile, builds the
  network with ``build_network``, loads the weights with cellpose's
  ``load_model`` and calls ``train_seg``.
- **engine**: ``create_local_session`` + ``run_training`` in the same process
  (the runner itself: validation, checkpoints, status file, curves).
- **CLI path**: what ``cellpose-finetuning train`` runs: ``create_local_session``
  + ``start_worker`` (a spawned worker process) + ``wait``.

The sides take turns (the order rotates every repetition), so drifting
machine load hits all of them alike. With validation ours validates after
every epoch and computes instance metrics at the end; ``train_seg`` only
evaluates a test loss at epochs 0, 5, 10, 20, ... So validation is reported
as its cost, not as an overhead ratio.

Run as a script, this module is one training run: ``python
benchmarks/bench_training.py '<json config>'``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DEV_DATA,
    THREADS,
    CaseResult,
    Context,
    Row,
    Target,
    emit,
    profile_call,
    profile_difference,
    run_python,
    set_torch_threads,
    summarize,
)
from fixtures import preset_checkpoint

TITLE = "Training overhead"
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
BATCH_SIZE = 1
SEED = 0
SIDES = ("ref", "engine", "cli")
LABELS = {"ref": "train_seg", "engine": "engine run_training", "cli": "CLI path (worker process)"}


def _pairs(split: str) -> list[tuple[str, str]]:
    images = sorted((DEV_DATA / "images" / split).glob("*.tif"))
    return [(str(p), str(DEV_DATA / "annotations" / split / p.name)) for p in images]


def _ref_validations(n_epochs: int) -> int:
    """How often train_seg evaluates the test loss (epoch 0, 5, then every 10th)."""
    return sum(1 for e in range(n_epochs) if e == 5 or e % 10 == 0)


# --------------------------------------------------------------------------- workers
def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": cfg["model"],
        "n_epochs": cfg["n_epochs"],
        "learning_rate": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "batch_size": BATCH_SIZE,
        "min_train_masks": 1,
        "seed": SEED,
        "lr_schedule": "cellpose",
        "validation_interval": 1 if cfg["validate"] else None,
        "device": "cpu",
    }


def _timed_attr(owner: Any, name: str, sink: list[float]) -> None:
    """Wrap ``owner.name`` so that each call's duration lands in ``sink`` (if it exists)."""
    import functools

    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(owner, name, timed)


def _engine(cfg: dict[str, Any]) -> dict[str, Any]:
    from cellpose_finetuning.engine import training
    from cellpose_finetuning.engine.runs import create_local_session

    # Instrumentation, not a change: time each validation and the final
    # instance metrics inside the run (private names; skipped if renamed).
    validations: list[float] = []
    metrics: list[float] = []
    if cfg["validate"]:
        _timed_attr(getattr(training, "EpochLoop", None), "validate", validations)
        _timed_attr(training, "_instance_metrics", metrics)
    session = create_local_session(
        out=cfg["out"],
        train_pairs=_pairs("train"),
        test_pairs=_pairs("test") if cfg["validate"] else [],
        settings=_settings(cfg),
    )
    status = training.run_training(session)
    return {
        "status": status.status_type,
        "message": status.message,
        "train_losses": status.train_losses,
        "n_validations": sum(1 for x in status.test_losses if x is not None),
        "validation_s": validations,
        "instance_metrics_s": sum(metrics) if metrics else None,
    }


def _cli(cfg: dict[str, Any]) -> dict[str, Any]:
    from cellpose_finetuning.engine.runs import create_local_session
    from cellpose_finetuning.engine.training import start_worker

    session = create_local_session(
        out=cfg["out"],
        train_pairs=_pairs("train"),
        test_pairs=_pairs("test") if cfg["validate"] else [],
        settings=_settings(cfg),
    )
    status = start_worker(session, num_threads=THREADS).wait()
    return {
        "status": status.status_type,
        "message": status.message,
        "train_losses": status.train_losses,
        "n_validations": sum(1 for x in status.test_losses if x is not None),
    }


def _ref(cfg: dict[str, Any]) -> dict[str, Any]:
    import tifffile
    import torch
    from cellpose import train

    from cellpose_finetuning.engine.models import PRESETS, build_network

    def read(pairs: list[tuple[str, str]]) -> tuple[list, list]:
        return (
            [tifffile.imread(a).astype("float32") for a, _ in pairs],
            [tifffile.imread(b) for _, b in pairs],
        )

    imgs, lbls = read(_pairs("train"))
    test_imgs, test_lbls = read(_pairs("test")) if cfg["validate"] else (None, None)
    # Seeded where run_training seeds, before the network is built, so that
    # stochastic depth draws the same numbers and the losses can be compared.
    torch.manual_seed(SEED)
    net = build_network(PRESETS[cfg["preset"]])
    net.load_model(cfg["model"], device=torch.device("cpu"))
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    _, train_losses, _ = train.train_seg(
        net,
        train_data=imgs,
        train_labels=lbls,
        test_data=test_imgs,
        test_labels=test_lbls,
        n_epochs=cfg["n_epochs"],
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        batch_size=BATCH_SIZE,
        min_train_masks=1,
        save_path=out,
        model_name="ref",
    )
    return {
        "status": "completed",
        "train_losses": [float(x) for x in train_losses],
        "n_validations": _ref_validations(cfg["n_epochs"]) if cfg["validate"] else 0,
    }


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One training run; the in-process clock starts after ``import torch``.

    The CLI driver never imports torch (its worker does), so its clock starts
    at once.
    """
    if cfg["side"] != "cli":
        set_torch_threads()
    body = {"ref": _ref, "engine": _engine, "cli": _cli}[cfg["side"]]
    t0 = time.perf_counter()
    if cfg.get("profile"):
        result, prof = profile_call(lambda: body(cfg))
        result["profile"] = prof
    else:
        result = body(cfg)
    result["in_process_s"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- the case
def _one(ctx: Context, cfg: dict[str, Any], tag: str) -> dict[str, Any]:
    out = ctx.work_dir / "training" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result, wall = run_python(
        [str(Path(__file__)), json.dumps({**cfg, "out": str(out)})],
        timeout=900,
        log_path=ctx.log_path(f"training-{tag}"),
    )
    if result["status"] != "completed":
        raise RuntimeError(f"{tag}: training ended {result['status']}: {result.get('message')}")
    result["wall_s"] = wall
    shutil.rmtree(out, ignore_errors=True)
    return result


def plans(quick: bool) -> list[tuple[str, int]]:
    """(preset, epochs) to measure."""
    return [("tiny", 3), ("small", 2)] if quick else [("tiny", 20), ("small", 5)]


def run(ctx: Context) -> CaseResult:
    """Measure both presets, with and without validation, every side."""
    reps = ctx.reps(3)
    val_reps = ctx.reps(2)  # no target on the runs with validation: fewer repetitions
    case = CaseResult(
        id="training",
        title=TITLE,
        ours_label="**engine**: `create_local_session` + `run_training` in one process; "
        "**CLI path**: `create_local_session` + `start_worker` (spawned worker process) + "
        "`wait`, what `cellpose-finetuning train` runs. `lr_schedule='cellpose'`, "
        f"{THREADS} torch threads",
        reference_label="a script: tifffile reads, `build_network` + cellpose `load_model`, "
        "`cellpose.train.train_seg` with the same images, weights, seed, epochs, batch size "
        f"{BATCH_SIZE}, learning rate, weight decay and schedule, {THREADS} torch threads",
    )
    raw: dict[str, Any] = {}
    for preset, n_epochs in plans(ctx.quick):
        model = str(preset_checkpoint(ctx, preset))
        base = {"preset": preset, "model": model, "n_epochs": n_epochs}
        runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for rep in range(reps):
            for validate in (False, True):
                if validate and rep >= val_reps:
                    continue
                sides = SIDES if not validate else ("ref", "engine")
                k = rep % len(sides)
                for side in sides[k:] + sides[:k]:  # rotate who goes first
                    tag = f"{preset}-{'val' if validate else 'noval'}-{side}-{rep}"
                    res = _one(ctx, {**base, "side": side, "validate": validate}, tag)
                    ctx.log(
                        f"  {tag}: wall {res['wall_s']:.2f} s, in-process "
                        f"{res['in_process_s']:.2f} s"
                    )
                    runs.setdefault((side, validate), []).append(res)
        raw[preset] = {f"{s}-{'val' if v else 'noval'}": r for (s, v), r in runs.items()}
        rows = _rows(preset, n_epochs, runs)
        case.rows += rows
        case.notes += _notes(preset, runs)
        if any(r.met is False for r in rows) or ctx.quick:
            # Where the time goes: one profiled run of the engine and of the reference.
            profiled = {}
            for side in ("engine", "ref"):
                tag = f"{preset}-noval-{side}-profile"
                res = _one(ctx, {**base, "side": side, "validate": False, "profile": True}, tag)
                profiled[side] = res["profile"]
                case.profiles.append(
                    {
                        "label": f"{preset}, {n_epochs} epochs, no validation, "
                        f"{LABELS[side]} (in-process part)",
                        **res["profile"],
                    }
                )
            case.notes.append(
                f"{preset}, profiled once more each: "
                + profile_difference(profiled["engine"], profiled["ref"])
                + ". Ours does this on top of train_seg's work: a status file per epoch, "
                "the last weights and the optimizer state, and the training-curves picture "
                "(matplotlib) at the end."
            )
    case.details = {
        "runs": raw,
        "settings": {
            "learning_rate": LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY,
            "batch_size": BATCH_SIZE,
            "seed": SEED,
            "lr_schedule": "cellpose",
            "torch_threads": THREADS,
            "data": "tests/assets/dev: 5 training pairs (3 nuclei 256x256, 2 bacteria "
            "288x320), 2 test pairs",
            "plans": [{"preset": p, "n_epochs": e} for p, e in plans(ctx.quick)],
        },
    }
    return case


def _col(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs]


def _rows(preset: str, n_epochs: int, runs: dict) -> list[Row]:
    ref0, eng0, cli0 = runs[("ref", False)], runs[("engine", False)], runs[("cli", False)]
    ref1, eng1 = runs[("ref", True)], runs[("engine", True)]
    label = f"{preset}, {n_epochs} epochs"
    target = Target("max_ratio", 1.05)
    rows = [
        Row(
            f"{label}, no validation, engine: process wall time",
            "s",
            summarize(_col(eng0, "wall_s")),
            summarize(_col(ref0, "wall_s")),
            target,
        ),
        Row(
            f"{label}, no validation, CLI path: process wall time",
            "s",
            summarize(_col(cli0, "wall_s")),
            summarize(_col(ref0, "wall_s")),
            target,
            note="a light driver process (it never imports torch) that spawns the worker "
            "process, which imports torch and cellpose and trains",
        ),
        Row(
            f"{label}, no validation, engine: process CPU time (user + system)",
            "s",
            summarize(_col(eng0, "cpu_s")),
            summarize(_col(ref0, "cpu_s")),
            note="the CPU the process (and its worker) used; other processes' load adds "
            "little to it",
        ),
        Row(
            f"{label}, no validation, engine: in-process time (after `import torch`)",
            "s",
            summarize(_col(eng0, "in_process_s")),
            summarize(_col(ref0, "in_process_s")),
            note="cellpose import, reading, flows, epochs, saving; without interpreter start",
        ),
        Row(
            f"{label}, validation every epoch, engine: process wall time",
            "s",
            summarize(_col(eng1, "wall_s")),
            summarize(_col(ref1, "wall_s")),
            note=f"ours validates {eng1[0]['n_validations']}× and computes instance metrics "
            f"at the end; train_seg evaluates its test loss {ref1[0]['n_validations']}×: "
            "not the same work, so no target",
        ),
    ]
    timed = [t for r in eng1 for t in r.get("validation_s") or []]
    if timed:
        rows.append(
            Row(
                f"{label}: one validation of ours (test loss + pixel metrics, 2 test images)",
                "s",
                summarize(timed),
                note="each `validate()` timed inside run_training; train_seg's own test-loss "
                "evaluation is inline and too short to tell apart from run-to-run noise",
            )
        )
    final = [r["instance_metrics_s"] for r in eng1 if r.get("instance_metrics_s") is not None]
    if final:
        rows.append(
            Row(
                f"{label}: final instance metrics (ours only: cellpose inference of the test "
                "images, AP)",
                "s",
                summarize(final),
            )
        )
    return rows


def _same_losses(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]]) -> bool:
    for a, b in zip(a_runs, b_runs, strict=True):
        la, lb = a["train_losses"], b["train_losses"]
        if len(la) != len(lb) or any(
            abs(x - y) > 1e-5 * max(1.0, abs(y)) for x, y in zip(la, lb, strict=True)
        ):
            return False
    return True


def _notes(preset: str, runs: dict) -> list[str]:
    ref0, eng0, cli0 = runs[("ref", False)], runs[("engine", False)], runs[("cli", False)]
    same = _same_losses(eng0, ref0) and _same_losses(runs[("engine", True)], runs[("ref", True)])
    start = {
        s: summarize([r["wall_s"] - r["in_process_s"] for r in runs[(s, False)]]).median
        for s in ("ref", "engine")
    }
    spawn = summarize(_col(cli0, "wall_s")).median - summarize(_col(eng0, "wall_s")).median
    return [
        f"{preset}: per-epoch training losses identical to train_seg's (rtol 1e-5): "
        f"{'yes' if same else 'NO (see the JSON)'}. Interpreter start and `import torch`: "
        f"{start['engine']:.2f} s (engine process) vs {start['ref']:.2f} s (reference). "
        f"The CLI path (driver + spawned worker) differs from the engine in one process by "
        f"{spawn:+.2f} s."
    ]


if __name__ == "__main__":
    emit(worker(json.loads(sys.argv[1])))
