"""Run the benchmark suite: ours against cellpose by hand, side by side, in one run.

Writes ``benchmarks/results/<machine>-<date>.json`` and regenerates
``docs/benchmarks.md``, then prints which targets are met. It never fails
because a target is missed (exit status 0); a case that crashes is recorded
as ``error`` with its message and the others still run.

Usage::

    .venv/bin/python benchmarks/run.py                 # everything (under 20 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # tiny sizes, 1-2 repetitions
    .venv/bin/python benchmarks/run.py --cases inference,service
    .venv/bin/python benchmarks/run.py --cases training --merge gpu.json
                                      # add a case measured elsewhere (bench_gpu.py --out)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before anything imports cellpose (here or in a subprocess): no downloads, no
# writes to the real ~/.cellpose, no GUI backend for the training curves.
_MODELS = Path(tempfile.gettempdir()) / "cpft-bench-cellpose-models"
os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", str(_MODELS))
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402
from common import (  # noqa: E402
    BENCH_DIR,
    DOC_PATH,
    RESULTS_DIR,
    CaseResult,
    Context,
    git_commit,
    machine_info,
    machine_slug,
    now_utc,
    print_summary,
    render_markdown,
    write_json,
)

PREAMBLE = """
How it is measured: every side runs in a fresh Python process of its own (training:
one per repetition; inference: one per image and side, alive together and taking
turns), with the same torch thread count, the same network file and the same input,
and OMP_WAIT_POLICY=PASSIVE (on a shared machine spinning OpenMP threads made timings
vary tenfold; `BENCH_OMP_WAIT_POLICY=` keeps the default).
Repetitions alternate or rotate which side goes first, so that drifting load on a
shared machine hits all sides alike. Where a target is missed the case profiles one
more run of each side with cProfile and shows the top of it below its table
("self time" per library says what is ours and what is cellpose's, torch's or the
network stack's). The `tiny`/`small` networks stand in for `cpsam` on a CPU: the
overhead of ours is per image, per batch and per run, not per FLOP, so a small
network shows it at its largest.
"""

CASES = {
    "training": "bench_training",
    "inference": "bench_inference",
    "service": "bench_service",
    "ray": "bench_ray",
    "gpu": "bench_gpu",
    "export": "bench_export",
    "fairness": "bench_fairness",
    "wsi": "bench_wsi",
    "wsi-paths": "bench_wsi_paths",
}


def _run_case(name: str, ctx: Context) -> dict:
    import importlib

    module = importlib.import_module(CASES[name])
    t0 = time.perf_counter()
    try:
        result = module.run(ctx)
        data = result.to_json() if isinstance(result, CaseResult) else dict(result)
    except Exception as exc:  # a broken case must not stop the others
        ctx.log(traceback.format_exc())
        first = str(exc).splitlines()[0] if str(exc) else ""
        data = CaseResult(
            id=name,
            title=getattr(module, "TITLE", name),
            status="error",
            reason=f"{type(exc).__name__}: {first}",
        ).to_json()
    data["duration_s"] = round(time.perf_counter() - t0, 1)
    return data


def _remove_dead_runs(scratch: Path) -> None:
    """Delete the scratch folders of earlier runs whose process is gone."""
    for old in scratch.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)


def _merged(paths: list[Path]) -> dict[str, dict]:
    """Cases measured elsewhere (``bench_gpu.py --out``), by case id."""
    out = {}
    for path in paths:
        data = json.loads(path.read_text())
        for case in data.get("cases", [data]):
            out[case["id"]] = case
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases, write the results and the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one repetition and smaller sizes (a smoke run)"
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="the markdown report to regenerate (default docs/benchmarks.md; with --quick "
        "only when given)",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the report")
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="a case JSON measured elsewhere (e.g. bench_gpu.py --out) to include as is; "
        "repeatable",
    )
    args = parser.parse_args(argv)

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    # A scratch folder per run (sessions, stacks, logs), so that two runs at
    # once (two engineers, one machine) never clear each other's files; only
    # the fixture cache in .work/cache is shared (written atomically).
    scratch = BENCH_DIR / ".work"
    _remove_dead_runs(scratch)
    work_dir = scratch / f"run-{os.getpid()}"
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    ctx = Context(quick=args.quick, work_dir=work_dir, log=log)
    t0 = time.perf_counter()
    started = now_utc()
    machine = machine_info()
    log(f"Machine: {machine['cpu_model']}, {machine['cores']} cores, GPU: {machine['gpu']}")
    merged = _merged(args.merge)
    results = []
    ran = [n for n in names if n not in merged]
    for name in names:
        if name in merged:
            log(f"== {name}: merged from {', '.join(map(str, args.merge))}")
            results.append(merged.pop(name))
            continue
        log(f"== {name}")
        result = _run_case(name, ctx)
        log(f"   {result['status']} in {result['duration_s']:.0f} s")
        results.append(result)
    results += merged.values()

    suffix = "-quick" if args.quick else ""
    path = args.results_dir / f"{machine_slug(machine)}-{started:%Y-%m-%d}{suffix}.json"
    record = {
        "suite": "cellpose-finetuning benchmarks",
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "quick": args.quick,
        "cases_run": ran,
        "merged": [str(p) for p in args.merge],
        "duration_s": round(time.perf_counter() - t0, 1),
        "fixtures_built_s": {k: round(v, 1) for k, v in fixtures.BUILT.items()},
        "machine": machine,
        "results_file": str(path.relative_to(BENCH_DIR.parent))
        if path.is_relative_to(BENCH_DIR.parent)
        else str(path),
        "cases": [{**r, "index": i} for i, r in enumerate(results, 1)],
    }
    write_json(path, record)
    log(f"\nResults: {path}")
    doc = args.doc or (None if args.quick else DOC_PATH)
    if doc and not args.no_doc:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_markdown(record, PREAMBLE))
        log(f"Report:  {doc}")
    print_summary(record, log)
    log(f"\nTotal: {record['duration_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
