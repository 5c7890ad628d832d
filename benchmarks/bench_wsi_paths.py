"""Case: a whole slide through the CLI and through the service, in bounded memory (#22).

The slide is ``bench_wsi.make_slide``'s (the dev nuclei tiled with Gaussian
noise, uncompressed uint16 TIFF, 16384² or ``BENCH_WSI_SIDE``), segmented
with the engine's automatic rule (block-wise above 16 megapixels, blocks
chosen from the available memory) by the two edges users have:

- **CLI**: ``cellpose-finetuning infer --model M slide.tif --out D --json``
  as a child of a measuring subprocess; peak RSS of the CLI process
  (``getrusage(RUSAGE_CHILDREN)`` after it exits), wall time of the
  command, objects from its JSON.
- **Service**: a measuring subprocess starts the embedded stack (SeaweedFS +
  Hypha, their own processes) and registers our service in itself
  (``deploy.serve.start_service``, as ``cellpose-finetuning serve`` does);
  a user uploads the slide to a dataset artifact, then ``infer`` on it
  answers with a job that is polled to its end (``get_inference_status``).
  Peak RSS of the service's process from just before ``infer`` (the kernel's
  counter reset after the upload; the polling client lives in it too),
  RSS of the stack's servers at the end, wall time from ``infer`` to
  ``completed`` (download to the service's cache, blocks, compression and
  upload of the labels), objects and the labels file's size.

Skipped with ``--quick``. Run as a script, this module is one subprocess:
``python benchmarks/bench_wsi_paths.py '<json config>'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_wsi import SLIDE_SIDE
from common import (
    MIB,
    ROOT,
    THREADS,
    CaseResult,
    Context,
    Row,
    Target,
    emit,
    peak_rss_now_bytes,
    reset_peak_rss,
    rss_bytes,
    run_python,
    skipped,
    summarize,
    worker_env,
)
from fixtures import cells_model

TITLE = "Whole-slide images through the CLI and the service (block-wise, bounded memory)"
CASE_ID = "wsi-paths"
GIB = 1024**3
MODEL_NAME = "bench-cells"
#: A block size for both paths (default: the engine's automatic rule); for smoke runs on
#: slides under 16 megapixels, which would otherwise run in one pass.
BLOCK = int(os.environ.get("BENCH_WSI_PATHS_BLOCK", "0")) or None


def _cli(cfg: dict[str, Any]) -> dict[str, Any]:
    """The CLI as a user runs it, in a child process; its peak RSS."""
    out = Path(cfg["out"])
    cmd = [
        sys.executable, "-m", "cellpose_finetuning.cli", "infer", "--model", cfg["model"],
        cfg["path"], "--out", str(out), "--json",
    ]  # fmt: skip
    if cfg.get("block_size"):
        cmd += ["--block-size", str(cfg["block_size"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=worker_env(), cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
    (entry,) = json.loads(proc.stdout)
    return {
        "wall": wall,
        "peak_rss": usage.ru_maxrss * 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
        "n_objects": entry["n_objects"],
        "blockwise": entry.get("blockwise"),
        "labels_bytes": Path(entry["masks"]).stat().st_size,
    }


async def _service(cfg: dict[str, Any]) -> dict[str, Any]:
    """Stack + service in this process; a user's infer on the slide, polled to its end."""
    import shutil

    import psutil
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.data.artifacts import upload_files
    from cellpose_finetuning.deploy.serve import start_service
    from cellpose_finetuning.deploy.testing import start_test_stack

    work = Path(cfg["work_dir"])
    data_dir = work / "stack"
    stack = service = None
    conns: list[Any] = []
    out: dict[str, Any] = {}
    try:
        stack = await asyncio.to_thread(start_test_stack, data_dir)
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg["model"], data_dir / "models" / f"{MODEL_NAME}.pth")
        token = stack.token("bench-service", roles=("admin",), workspace=stack.workspace)
        admin, server, service, _info = await start_service(
            stack.server_url, token, data_dir, {"worker_threads": 1}, stack.workspace
        )
        conns += [admin, server]
        alice = await connect_to_server(
            {"server_url": stack.server_url, "token": stack.token("alice")}
        )
        conns.append(alice)
        svc = await alice.get_service(f"{server.config.workspace}/cellpose-finetuning")
        am = await alice.get_service("public/artifact-manager")
        ds = await am.create(
            alias="bench-slide", type="dataset", stage=True, manifest={"name": "bench-slide"}
        )
        await upload_files(am, ds["id"], {"slide.tif": Path(cfg["path"])})
        out["rss_before"] = rss_bytes()
        reset = reset_peak_rss()
        t0 = time.perf_counter()
        (item,) = await svc.infer(
            model=MODEL_NAME,
            artifact=ds["id"],
            image_paths=["slide.tif"],
            block_size=cfg.get("block_size"),
        )
        out["answer_s"] = time.perf_counter() - t0
        polls = 0
        while True:
            status = await svc.get_inference_status(item["job_id"])
            polls += 1
            if status["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(2.0)  # a client's polling interval
        out["wall"] = time.perf_counter() - t0
        out["peak_rss"] = peak_rss_now_bytes() if reset else None
        out["status"] = status
        out["polls"] = polls
        servers = {}
        for name, pid in stack.pids.items():
            with contextlib.suppress(psutil.Error):
                servers[name] = psutil.Process(pid).memory_info().rss
        out["server_rss"] = servers
        if status["status"] != "completed":
            raise RuntimeError(f"the job failed: {status.get('error')}")
    finally:
        if service is not None:
            with contextlib.suppress(Exception):
                await service.close()
        for c in conns:
            with contextlib.suppress(Exception):
                await c.disconnect()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    return out


def worker(cfg: dict[str, Any]) -> None:
    """One side; prints one JSON line."""
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    if cfg["side"] == "cli":
        emit(_cli(cfg))
    else:
        emit(asyncio.run(_service(cfg)))


def run(ctx: Context) -> CaseResult:
    """Make the slide once; the CLI and the service segment it, each in its own subprocess."""
    if ctx.quick or not SLIDE_SIDE:
        return skipped(CASE_ID, TITLE, "--quick" if ctx.quick else "BENCH_WSI_SIDE=0")
    model = cells_model(ctx)
    side = SLIDE_SIDE
    slide = ctx.work_dir / f"slide-{side}.tif"
    bench_wsi = str(Path(__file__).with_name("bench_wsi.py"))
    made, _ = run_python(
        [bench_wsi, json.dumps({"side": "make_slide", "size": side, "path": str(slide)})],
        timeout=3600,
        log_path=ctx.log_path("wsi-paths-make"),
    )
    results: dict[str, Any] = {}
    try:
        for side_name in ("cli", "service"):
            cfg = {
                "side": side_name,
                "model": str(model),
                "path": str(slide),
                "out": str(ctx.work_dir / "wsi-cli-out"),
                "work_dir": str(ctx.work_dir / "wsi-service"),
                "block_size": BLOCK,
            }
            results[side_name], _ = run_python(
                [str(Path(__file__)), json.dumps(cfg)],
                timeout=4 * 3600,
                log_path=ctx.log_path(f"wsi-paths-{side_name}"),
            )
            ctx.log(f"  {side}² via {side_name}: {json.dumps(results[side_name])[:400]}")
    finally:
        slide.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(ctx.work_dir / "wsi-cli-out", ignore_errors=True)
        shutil.rmtree(ctx.work_dir / "wsi-service", ignore_errors=True)
    cli, srv = results["cli"], results["service"]
    st = srv["status"]
    servers = ", ".join(f"{k} {v / MIB:,.0f} MiB" for k, v in srv["server_rss"].items())
    case = CaseResult(
        id=CASE_ID,
        title=TITLE,
        ours_label=f"{side}² uint16 slide ({made['bytes'] / MIB:,.0f} MiB TIFF), the tiny "
        f"network trained on synthetic cells, float32 on the CPU, {THREADS} torch threads; "
        "automatic block size",
    )
    bw = cli.get("blockwise") or {}
    case.rows += [
        Row(
            f"{side}² via the CLI: peak RSS of the `infer` process",
            "MiB",
            summarize([cli["peak_rss"] / MIB]),
            target=Target("max_value", 3 * GIB / MIB),
            note=f"blocks of {bw.get('block_size')}², {bw.get('n_blocks')} blocks; labels "
            f"written region by region to a {cli['labels_bytes'] / MIB:,.0f} MiB BigTIFF",
        ),
        Row(f"{side}² via the CLI: wall time of the command", "s", summarize([cli["wall"]])),
        Row(f"{side}² via the CLI: objects", "", summarize([cli["n_objects"]])),
        Row(
            f"{side}² via the service: peak RSS of the service's process during the job",
            "MiB",
            summarize([srv["peak_rss"] / MIB]),
            target=Target("max_value", 3 * GIB / MIB),
            note=f"RSS before infer {srv['rss_before'] / MIB:,.0f} MiB; the stack's servers "
            f"at the end: {servers}",
        ),
        Row(
            f"{side}² via the service: infer to completed (job)",
            "s",
            summarize([srv["wall"]]),
            note=f"infer answered in {srv['answer_s']:.1f} s with the job id (download to "
            f"the cache included); {st['blocks_total']} blocks of {st['block_size']}²; "
            f"labels {st['file_bytes'] / MIB:,.1f} MiB (zlib-tiled) in a result artifact",
        ),
        Row(f"{side}² via the service: objects", "", summarize([st["n_objects"]])),
    ]
    case.details = {"cli": cli, "service": srv, "slide": made}
    return case


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
