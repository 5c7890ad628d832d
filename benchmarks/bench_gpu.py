"""Case 5: the real-size Cellpose-SAM network on the GPU, against the ideal from its FLOPs.

Only where ``torch.cuda.is_available()``; elsewhere the case is one row
"skipped: no GPU". The network is the ``cpsam`` preset (ViT-L, 304.6 M
parameters) built untrained by ``build_network``: nothing is downloaded,
and speed does not depend on the weights. Measured on the GPU:

- the network forward per 256² tile (batches of 8, cellpose's default
  ``batch_size``), in bfloat16 (cellpose's default on CUDA, and ours) and
  float32;
- one 2048² image (the dev nuclei image tiled up) through our
  ``segment()`` and through ``CellposeModel.eval`` of the same wrapped
  network (the whole pipeline: tiling, network, flow dynamics, masks);
- one training step (forward, cellpose's loss, backward, AdamW) at batch 1
  and 8, in float32 (our runner trains in float32) and bfloat16 (what
  ``train_seg`` does with a bfloat16 network);
- peak GPU memory (``torch.cuda.max_memory_allocated``) of each.

The reference column is the ideal time: the FLOPs of the work, counted by
``torch.utils.flop_counter`` on one tile (about 0.6 TFLOP per 256² tile
forward; a training step is taken as 3× the forward), divided by the
device's dense peak for that precision (:data:`PEAK_TFLOPS`). With
``torch.backends.cuda.matmul.allow_tf32`` on (importing cellpose turns it
on), float32 matmuls run on TF32 tensor cores, so their ideal uses the TF32
peak. Ratio = measured / ideal = 1 / (model FLOP utilisation).

Standalone, for a GPU machine (the JSON is one case, merged into a full
run's results with ``run.py --merge FILE``)::

    .venv/bin/python benchmarks/bench_gpu.py --out gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --out smoke.json --device cpu --preset tiny --quick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CaseResult,
    Context,
    Row,
    dev_image,
    gpu_info,
    machine_info,
    run_python,
    set_torch_threads,
    skipped,
    summarize,
    write_json,
)

TITLE = "GPU: real-size Cellpose-SAM against its FLOPs"

#: Dense peak TFLOP/s by device name (first match wins): (bf16, tf32, fp32).
PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("V100", (125.0, 0.0, 15.7)),  # fp16 tensor cores; no bf16
]
FALLBACK_TILE_FLOP = 0.6e12


def peak_tflops(device_name: str) -> tuple[float, float, float] | None:
    """(bf16, tf32, fp32) dense peaks of ``device_name``, or None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks
    return None


# --------------------------------------------------------------------------- measuring
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: Any) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**2
    return None


def _timed(fn: Any, device: Any, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def tile_flops(net: Any, device: Any, dtype: Any, bsize: int) -> float:
    """FLOPs of one tile's forward, counted by torch (fallback: the 0.6 TFLOP estimate)."""
    import torch

    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros((1, 3, bsize, bsize), device=device, dtype=dtype)
        net.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        return float(counter.get_total_flops())
    except Exception:
        return FALLBACK_TILE_FLOP


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the case, as plain numbers."""
    import torch
    from cellpose import train as cp_train

    from cellpose_finetuning.engine.inference import segment
    from cellpose_finetuning.engine.models import PRESETS, build_network, wrap_network

    set_torch_threads()
    device = torch.device(args.device)
    arch = PRESETS[args.preset]
    bsize = arch.bsize
    reps = 3 if args.quick else 10
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset,
        "image_size": args.image_size,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
    }
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = build_network(arch)
    out["build_s"] = time.perf_counter() - t0
    out["params"] = sum(p.numel() for p in base.parameters())
    image = dev_image(args.image_size)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        net = build_network(arch, dtype=dtype)
        net.load_state_dict(base.state_dict())
        net.to(device)
        net.eval()
        flops = tile_flops(net, device, dtype, bsize)
        x = torch.randn((8, 3, bsize, bsize), device=device, dtype=dtype)

        def forward(net: Any = net, x: Any = x) -> None:
            with torch.no_grad():
                net(x)

        _reset_peak(device)
        times = _timed(forward, device, reps, warmup=2)
        out[f"tile_{name}"] = {
            "per_tile_s": [t / 8 for t in times],
            "flops_per_tile": flops,
            "peak_mib": _peak_mib(device),
        }
        model = wrap_network(net, device, f"{args.preset}-{name}")
        segment(model, image[None, :bsize, :bsize])  # warm-up
        img_reps = 2 if args.quick else 3
        for side, fn in (
            ("ours", lambda m=model: segment(m, image[None])),
            ("ref", lambda m=model: m.eval(image)),
        ):
            _reset_peak(device)
            out[f"image_{name}_{side}"] = {
                "times": _timed(fn, device, img_reps, warmup=0),
                "peak_mib": _peak_mib(device),
            }
        out[f"image_{name}_tiles"] = _n_tiles(args.image_size, bsize)
        del model, net, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for batch in (1, 8):
            out[f"train_{name}_b{batch}"] = _train_steps(
                base, arch, device, dtype, batch, reps, cp_train
            )
    out["flops_per_tile"] = out["tile_fp32"]["flops_per_tile"]
    return out


def _n_tiles(size: int, bsize: int, overlap: float = 0.1) -> int:
    padded = -(-size // 16) * 16 + 16  # cellpose's get_pad_yx for large images
    per_axis = 1 if padded <= bsize else math.ceil((1 + 2 * overlap) * padded / bsize)
    return per_axis * per_axis


def _train_steps(
    base: Any, arch: Any, device: Any, dtype: Any, batch: int, reps: int, cp_train: Any
) -> dict[str, Any]:
    import torch

    from cellpose_finetuning.engine.models import build_network

    net = build_network(arch, dtype=dtype)
    net.load_state_dict(base.state_dict())
    net.to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.1)
    x = torch.randn((batch, 3, arch.bsize, arch.bsize), device=device, dtype=dtype)
    lbl = torch.rand((batch, 3, arch.bsize, arch.bsize), device=device, dtype=dtype)

    def step() -> None:
        y = net(x)[0]
        loss = cp_train._loss_fn_seg(lbl, y, device)
        opt.zero_grad()
        loss.backward()
        opt.step()

    _reset_peak(device)
    try:
        times = _timed(step, device, reps, warmup=2)
        result: dict[str, Any] = {"times": times, "peak_mib": _peak_mib(device)}
    except torch.OutOfMemoryError as exc:
        result = {"error": f"out of memory: {exc}".splitlines()[0]}
    return result  # the network and optimizer are freed on return


# --------------------------------------------------------------------------- rows
def rows_from(m: dict[str, Any]) -> tuple[list[Row], list[str]]:
    """Table rows (measured against ideal) and notes from :func:`measure`'s numbers."""
    peaks = peak_tflops(m["device"])
    flops = m["flops_per_tile"]
    notes = [
        f"{m['device']}: {m['params'] / 1e6:.1f} M parameters, {flops / 1e12:.3f} TFLOP per "
        f"{'256²' if m['preset'] == 'cpsam' else 'tile'} forward (torch's FLOP counter); "
        f"allow_tf32={m['allow_tf32']}; torch {m['torch_version']}, CUDA {m['cuda_version']}."
    ]
    if peaks is None:
        notes.append(f"No peak TFLOP/s known for {m['device']!r}: no ideal times.")

    def ideal(work_flops: float, precision: str) -> Any:
        if peaks is None:
            return None
        bf16, tf32, fp32 = peaks
        peak = {"bf16": bf16, "fp32": tf32 if m["allow_tf32"] and tf32 else fp32}[precision]
        return summarize([work_flops / (peak * 1e12)])

    def mem(d: dict[str, Any]) -> str:
        return f"; peak GPU memory {d['peak_mib']:,.0f} MiB" if d.get("peak_mib") else ""

    rows = []
    for p in ("bf16", "fp32"):
        t = m[f"tile_{p}"]
        rows.append(
            Row(
                f"network forward per 256² tile, {p} (batches of 8)",
                "s",
                summarize(t["per_tile_s"]),
                ideal(t["flops_per_tile"], p),
                note=f"{t['flops_per_tile'] / 1e12:.3f} TFLOP per tile{mem(t)}",
            )
        )
    for p in ("bf16", "fp32"):
        n = m[f"image_{p}_tiles"]
        for side, what in (("ours", "`segment()`"), ("ref", "`CellposeModel.eval`")):
            d = m[f"image_{p}_{side}"]
            rows.append(
                Row(
                    f"{m['image_size']}² image, {p}, {what} (whole pipeline)",
                    "s",
                    summarize(d["times"]),
                    ideal(n * flops, p),
                    note=f"ideal = {n} tiles × the tile FLOPs (the network only){mem(d)}",
                )
            )
    for p in ("fp32", "bf16"):
        for b in (1, 8):
            d = m[f"train_{p}_b{b}"]
            if "error" in d:
                rows.append(Row(f"training step, batch {b}, {p}: {d['error']}", "s", None))
                continue
            rows.append(
                Row(
                    f"training step, batch {b}, {p} (forward, loss, backward, AdamW)",
                    "s",
                    summarize(d["times"]),
                    ideal(3 * b * flops, p),
                    note=f"ideal = 3 × forward FLOPs × batch{mem(d)}",
                )
            )
    return rows, notes


def case_from(m: dict[str, Any], machine: dict[str, Any]) -> CaseResult:
    """The case's result from the measurements."""
    rows, notes = rows_from(m)
    return CaseResult(
        id="gpu",
        title=TITLE,
        ours_label=f"the `{m['preset']}` preset"
        + (" (ViT-L, the real Cellpose-SAM size)" if m["preset"] == "cpsam" else "")
        + f" built by `build_network`, untrained, on {m['device']}; whole images through our "
        "`segment()` and cellpose's `eval`",
        reference_label="ideal time = FLOPs / dense peak of the device "
        "(bf16, or TF32 for float32 matmuls when allow_tf32 is on); ratio = 1 / utilisation",
        rows=rows,
        notes=notes,
        details={"measurements": m, "machine": machine},
    )


def run(ctx: Context) -> CaseResult | dict[str, Any]:
    """From ``run.py``: skip without a GPU, else measure in a subprocess (its JSON)."""
    if not gpu_info():
        return skipped("gpu", TITLE, "no GPU")
    out = ctx.work_dir / "gpu.json"
    args = [str(Path(__file__)), "--out", str(out)] + (["--quick"] if ctx.quick else [])
    run_python(args, timeout=1800, log_path=ctx.log_path("gpu"))
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: measure and write the case JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the case JSON to write")
    parser.add_argument("--device", default="cuda", help="torch device (cpu: smoke test)")
    parser.add_argument("--preset", default="cpsam", help="network preset (tiny: smoke test)")
    parser.add_argument("--image-size", type=int, default=2048, help="whole-image side")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    import torch

    machine = machine_info()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        case = skipped("gpu", TITLE, "no GPU")
    else:
        t0 = time.perf_counter()
        case = case_from(measure(args), machine)
        case.duration_s = time.perf_counter() - t0
        if args.device == "cpu":
            case.title += " (CPU smoke test: not a GPU figure)"
    case.details.setdefault("machine", machine)
    write_json(args.out, case.to_json())
    print(json.dumps({"out": str(args.out), "status": case.status}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
