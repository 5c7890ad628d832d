"""Case 6: the real-size Cellpose-SAM network exported as a standard-form BioImage.IO package.

The network is the ``cpsam`` preset (ViT-L, 304.6 M parameters) built
untrained by ``build_network`` (nothing is downloaded; the export does not
depend on the weights' values), saved as a completed session's checkpoint.
``build_package`` then writes the standard form on the CPU: the
``pytorch_state_dict`` weights, their ``torchscript`` trace and ``onnx``
export (``bioimageio.core``'s converters), the test tensors made by running
the package, and the ``bioimageio.spec`` validation of the whole. Measured:
the wall time of the whole export and of each conversion, the size of each
weight file, the peak memory of the process, and how far the converted
networks' flows are from the PyTorch network's on one 256² tile.

There is no reference to compare with (cellpose has no exporter), so the
rows have no ratio. Standalone::

    .venv/bin/python benchmarks/bench_export.py --out export.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# As run.py: no cellpose downloads, no writes to the real ~/.cellpose, no GUI backend.
os.environ.setdefault(
    "CELLPOSE_LOCAL_MODELS_PATH", str(Path(tempfile.gettempdir()) / "cpft-bench-cellpose-models")
)
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CaseResult, Context, Row, summarize, write_json

TITLE = "Export: real-size Cellpose-SAM as a standard-form BioImage.IO package (CPU)"
#: Random weights: every pixel counts as foreground (their flows still converge into many
#: small objects), so the first sample image gives the non-empty test output the export needs.
CELLPROB_THRESHOLD = -10.0


def _session(root: Path, preset: str) -> Any:
    import torch

    from cellpose_finetuning.engine.models import PRESETS, build_network, save_network
    from cellpose_finetuning.engine.schemas import TrainingSettings
    from cellpose_finetuning.engine.sessions import DataSpec, SessionStore

    dev = Path(__file__).resolve().parents[1] / "tests" / "assets" / "dev"
    pairs = [
        (str(p), str(dev / "annotations" / "test" / p.name))
        for p in sorted((dev / "images" / "test").glob("*.tif"))
    ]
    torch.manual_seed(0)
    weights = root / f"{preset}.pth"
    save_network(build_network(PRESETS[preset]), PRESETS[preset], weights)
    session = SessionStore(root / "sessions").create(
        TrainingSettings(model=str(weights), n_epochs=1), DataSpec(train=pairs, test=pairs)
    )
    (session.path / "weights").mkdir(exist_ok=True)
    weights.replace(session.path / "weights" / "best.pth")
    session.update_status(status_type="completed", message="benchmark", train_losses=[1.0])
    return session


def _flow_differences(package: Path) -> dict[str, float]:
    """Max |converted - PyTorch| of the flows on one random 256² tile."""
    import numpy as np
    import onnxruntime
    import torch
    import yaml

    from cellpose_finetuning.export.bioimageio import standard as std
    from cellpose_finetuning.export.bioimageio.runtime import _load_exported_model

    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    entry = rdf["weights"]["pytorch_state_dict"]
    net = _load_exported_model(package, entry["architecture"], entry["source"])
    tile = np.random.default_rng(0).random((1, 1, 256, 256), dtype=np.float32)
    with torch.no_grad():
        reference = net(torch.from_numpy(tile)).numpy()
        scripted = torch.jit.load(package / std.TORCHSCRIPT_FILE)(torch.from_numpy(tile)).numpy()
    onnx = onnxruntime.InferenceSession(str(package / std.ONNX_FILE)).run(None, {"input": tile})[0]
    return {
        "torchscript": float(np.abs(scripted - reference).max()),
        "onnx": float(np.abs(onnx - reference).max()),
    }


def measure(work_dir: Path, preset: str = "cpsam") -> dict[str, Any]:
    """Export one session and return the figures."""
    from bioimageio.core.weight_converters import pytorch_to_onnx, pytorch_to_torchscript

    from cellpose_finetuning.engine.schemas import InferenceSettings
    from cellpose_finetuning.export.bioimageio import build_package

    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    # Time the converters where build_package calls them, without changing what it does.
    pytorch_to_torchscript.convert = timed("torchscript", pytorch_to_torchscript.convert)
    pytorch_to_onnx.convert = timed("onnx", pytorch_to_onnx.convert)
    session = _session(work_dir, preset)
    t0 = time.perf_counter()
    result = build_package(
        session,
        work_dir / "pkg",
        inference=InferenceSettings(cellprob_threshold=CELLPROB_THRESHOLD, flow_threshold=0.0),
    )
    total = time.perf_counter() - t0
    sizes = {name: path.stat().st_size for name, path in result.files.items() if path.is_file()}
    return {
        "preset": preset,
        "export_s": total,
        "torchscript_s": timings.get("torchscript"),
        "onnx_s": timings.get("onnx"),
        "sizes": sizes,
        "package_bytes": sum(sizes.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "flow_max_abs_diff": _flow_differences(result.path),
        "warnings": result.warnings,
    }


def _case(data: dict[str, Any]) -> CaseResult:
    mib = 1 << 20
    sizes = data["sizes"]
    weight_files = {
        "pytorch_state_dict (model_weights.pth)": sizes.get("model_weights.pth", 0),
        "torchscript (model_torchscript.pt)": sizes.get("model_torchscript.pt", 0),
        "onnx (model.onnx + model.onnx.data)": sizes.get("model.onnx", 0)
        + sizes.get("model.onnx.data", 0),
    }
    rows = [
        Row(
            f"{data['preset']}: whole export (build, convert, label, validate)",
            "s",
            summarize([data["export_s"]]),
        ),
        Row("torchscript conversion (trace)", "s", summarize([data["torchscript_s"]])),
        Row("onnx conversion (torch.onnx.export)", "s", summarize([data["onnx_s"]])),
        *[Row(f"size: {k}", "MiB", summarize([v / mib])) for k, v in weight_files.items()],
        Row("size: whole package folder", "MiB", summarize([data["package_bytes"] / mib])),
        Row(
            "peak memory of the exporting process", "MiB", summarize([data["peak_rss_bytes"] / mib])
        ),
        *[
            Row(
                f"max abs difference of the {k} flows from PyTorch's, one 256² tile",
                "",
                summarize([v]),
            )
            for k, v in data["flow_max_abs_diff"].items()
        ],
    ]
    return CaseResult(
        id="export",
        title=TITLE,
        ours_label="`build_package` (standard form) of a `cpsam`-architecture session with "
        "random weights, on the CPU",
        reference_label="none (cellpose has no exporter)",
        rows=rows,
        notes=[
            "Measured on a shared machine (load average 15-29 on 2 cores during the run), so "
            "the times are upper bounds; sizes and memory do not depend on the load.",
            "The torchscript trace of the random-weight ViT-L differs from the eager network "
            "by up to ~1 in its flows (torch.jit's own trace check already reported 1.4e-3 "
            "on its rerun); the onnx export matches to 3e-6. With the tiny network both "
            "match to within 1e-4 (default test suite). Untrained ViT-L activations are "
            "large; whether trained cpsam weights show the same torchscript drift is not "
            "measured here.",
            "The package validates with bioimageio.spec (build_package refuses it otherwise); "
            "bioimageio.core's model test of the tiny network's package in each format runs "
            "in the default test suite (tests/export/test_bioimageio_standard.py).",
        ],
        details=data,
    )


def run(ctx: Context) -> CaseResult:
    """The benchmark runner's entry point."""
    return _case(measure(ctx.work_dir / "export", "tiny" if ctx.quick else "cpsam"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="cpsam")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.work/export"))
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    case = _case(measure(args.work_dir, args.preset)).to_json()
    write_json(args.out, case)
    print(json.dumps({k: v for k, v in case["details"].items() if k != "sizes"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
