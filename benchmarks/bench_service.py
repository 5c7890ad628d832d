"""Case 3: the service path: what a call over Hypha costs on top of the work it does.

A measuring subprocess starts the real embedded stack (SeaweedFS + Hypha) on
free ports with ``deploy.testing.start_test_stack``, registers our service on
it with ``deploy.serve.start_service`` (what ``cellpose-finetuning serve``
does once the stack is up; the service runs in this process, as in the test
suite), and measures as user ``alice`` over hypha-rpc:

1. **Per-call overhead**: ``list_pretrained_models`` against a bare ``ping``
   service registered the same way (public, ``require_context``) by another
   connection: the same client → Hypha → service hops, so the ratio is what
   our method adds to hypha-rpc's own round trip. Target: ours ≤ 5 ms median.
2. **infer on a 2048² float32 image** (the dev nuclei image tiled up): sent
   as an array, read from a dataset artifact (the service's download cache
   is emptied before each call), and the engine directly (``ModelCache`` +
   ``segment`` in the same process). Same model: the tiny network of case 2.
3. **Dataset fetch**: 2500 small TIFFs (64×64 crops of the dev images) of a
   dataset artifact, ``ArtifactFiles.download`` into a fresh cache
   directory, two ways: with the direct S3 reader the service gets on the
   embedded stack, and with presigned URLs (what runs against an external
   Hypha server); against raw S3 GETs of the same objects with boto3 and the
   stack's S3 keys (16 threads, as our 16 concurrent reads), written to disk
   the same way; the three interleaved in one run. Target (direct): ≥ 80 %
   of raw throughput. ``BENCH_SERVICE_FETCH_ONLY=1`` measures this part alone.

Everything is stopped at the end, also on errors; if the subprocess itself
dies, the driver stops the servers it recorded in ``stack.pids``.

Run as a script, this module is the measuring subprocess:
``python benchmarks/bench_service.py '<json config>'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
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
    dev_image,
    emit,
    profile_async,
    pyspy_summary,
    run_python,
    set_torch_threads,
    summarize,
)
from fixtures import cells_model

TITLE = "Service path"
MODEL_NAME = "bench-cells"
SERVICE_USER = "cellpose-service"


# --------------------------------------------------------------------------- measuring
async def _timed_calls(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def _rpc_overhead(svc: Any, ping: Any, calls: int) -> dict[str, Any]:
    for fn in (svc.list_pretrained_models, ping.ping):
        await _timed_calls(fn, 20)  # warm-up
    ours: list[float] = []
    ref: list[float] = []
    block = 25
    for i in range(max(1, calls // block)):
        pair = [(svc.list_pretrained_models, ours), (ping.ping, ref)]
        for fn, sink in pair if i % 2 == 0 else pair[::-1]:
            sink += await _timed_calls(fn, block)
    return {"ours": ours, "ref": ref}


async def _infer(cfg: dict[str, Any], svc: Any, server: Any, data_dir: Path) -> dict[str, Any]:
    import numpy as np
    import tifffile

    from cellpose_finetuning.data.artifacts import upload_files
    from cellpose_finetuning.engine.inference import ModelCache, ModelRef, segment

    image = dev_image(cfg["infer_size"])
    tif = data_dir.parent / "infer-image.tif"
    tifffile.imwrite(tif, image)
    am = await server.get_service("public/artifact-manager")
    ds = await am.create(
        alias="bench-infer", type="dataset", stage=True, manifest={"name": "bench-infer"}
    )
    await upload_files(am, ds["id"], {"image.tif": tif})
    artifact = f"{server.config.workspace}/bench-infer"
    cache = data_dir / "cache"
    model = ModelCache().get(ModelRef(MODEL_NAME, str(cfg["model"]), "checkpoint"))

    async def engine() -> Any:
        return await asyncio.to_thread(segment, model, image[None])

    async def as_array() -> Any:
        return (await svc.infer(model=MODEL_NAME, input_arrays=[image]))[0]["output"]

    async def from_artifact() -> Any:
        shutil.rmtree(cache, ignore_errors=True)  # a cold read every time
        cache.mkdir()
        result = await svc.infer(model=MODEL_NAME, artifact=artifact, image_paths=["image.tif"])
        return result[0]["output"]

    # Warm-up: the service loads the model into its cache; the engine's first call.
    await svc.infer(model=MODEL_NAME, input_arrays=[image[:256, :256].copy()])
    await asyncio.to_thread(segment, model, image[None, :256, :256])
    ways = {"engine": engine, "array": as_array, "artifact": from_artifact}
    times: dict[str, list[float]] = {k: [] for k in ways}
    masks: dict[str, Any] = {}
    names = list(ways)
    for rep in range(cfg["infer_reps"]):
        for name in names[rep % 3 :] + names[: rep % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            masks[name] = await ways[name]()
            times[name].append(time.perf_counter() - t0)
    same = all(np.array_equal(masks["engine"], m) for m in masks.values())
    return {
        **times,
        "same_masks": same,
        "n_objects": int(masks["engine"].max()),
        "image_bytes": image.nbytes,
        "tif_bytes": tif.stat().st_size,
        "mask_bytes": masks["engine"].nbytes,
    }


def _small_files(src: Path, n: int) -> dict[str, Path]:
    """``n`` 64×64 uint16 crops of the dev training images as TIFF files."""
    import tifffile

    images = [tifffile.imread(p) for p in sorted((DEV_DATA / "images" / "train").glob("*.tif"))]
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        img = images[i % len(images)]
        y = (i * 37) % (img.shape[0] - 64)
        x = (i * 53) % (img.shape[1] - 64)
        path = src / f"f{i:05d}.tif"
        tifffile.imwrite(path, img[y : y + 64, x : x + 64])
        files[f"tiles/f{i:05d}.tif"] = path
    return files


async def _fetch(cfg: dict[str, Any], server: Any, stack: Any, work: Path) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    import boto3
    from botocore.config import Config

    from cellpose_finetuning.data.artifacts import ArtifactFiles, upload_files
    from cellpose_finetuning.data.s3direct import DirectS3Reader

    n = cfg["n_files"]
    files = _small_files(work / "fetch-src", n)
    am = await server.get_service("public/artifact-manager")
    ds = await am.create(
        alias="bench-files", type="dataset", stage=True, manifest={"name": "bench-files"}
    )
    t0 = time.perf_counter()
    await upload_files(am, ds["id"], files, concurrency=16)
    upload_s = time.perf_counter() - t0
    artifact = f"{server.config.workspace}/bench-files"
    paths = sorted(files)
    total_bytes = sum(p.stat().st_size for p in files.values())

    # The S3 keys behind the artifact's files, read from presigned URLs
    # (/bucket/key?signature), outside the timing.
    urls: dict[str, str] = {}
    for i in range(0, n, 500):
        urls.update(await am.get_file(artifact, file_path=paths[i : i + 500], silent=True))
    bucket = urlparse(urls[paths[0]]).path.lstrip("/").split("/", 1)[0]
    keys = {p: urlparse(u).path.lstrip("/").split("/", 1)[1] for p, u in urls.items()}
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=stack.secrets["s3_access_key"],
        aws_secret_access_key=stack.secrets["s3_secret_key"],
        region_name="us-east-1",
        config=Config(max_pool_connections=16, retries={"max_attempts": 3}),
    )
    s3.head_object(Bucket=bucket, Key=keys[paths[0]])  # connect and sign once

    def raw(dest: Path) -> None:
        def get(path: str) -> None:
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(s3.get_object(Bucket=bucket, Key=keys[path])["Body"].read())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(get, paths))

    # ours: what the service does on the embedded stack (S3 read directly with the
    # stack's keys); presigned: the external-server path (the reader off).
    reader = DirectS3Reader(stack.s3_access(), threads=16)

    async def ours(dest: Path) -> None:
        await ArtifactFiles(am, dest, concurrency=16, direct=reader).download(artifact, paths)

    async def presigned(dest: Path) -> None:
        await ArtifactFiles(am, dest, concurrency=16).download(artifact, paths)

    async def presign_only() -> None:
        for i in range(0, n, 500):
            await am.get_file(artifact, file_path=paths[i : i + 500], silent=True)

    sides = ("ours", "presigned", "raw")
    times: dict[str, list[float]] = {side: [] for side in (*sides, "presign")}
    for rep in range(cfg["fetch_reps"]):
        for side in sides[rep % 3 :] + sides[: rep % 3]:  # each side first once in 3 reps
            dest = work / f"fetch-{side}-{rep}"
            t0 = time.perf_counter()
            if side == "ours":
                await ours(dest)
            elif side == "presigned":
                await presigned(dest)
            else:
                await asyncio.to_thread(raw, dest)
            times[side].append(time.perf_counter() - t0)
            got = sum(1 for _ in dest.rglob("*.tif"))
            if got != n:
                raise RuntimeError(f"{side} fetched {got} of {n} files")
            shutil.rmtree(dest)
        if rep == 0:  # the URLs alone, once: they are the same work every time
            t0 = time.perf_counter()
            await presign_only()
            times["presign"].append(time.perf_counter() - t0)
    if reader.fallbacks or reader.reads != n * cfg["fetch_reps"]:
        raise RuntimeError(f"direct reads: {reader.reads} read, {reader.fallbacks} fell back")
    reader.close()
    import importlib.util

    out: dict[str, Any] = {
        **times,
        "n_files": n,
        "bytes": total_bytes,
        "upload_s": upload_s,
        "sniffio": importlib.util.find_spec("sniffio") is not None,
    }
    if cfg["profile"] or _throughput_ratio(times) < 0.8:
        out["server_profile"] = await _spy_on_presign(stack, work, presign_only)
        # Where our download's time goes: one more run under cProfile (this
        # process only: the event loop, httpx, hypha-rpc's client side).
        dest = work / "fetch-profile"
        _, out["profile"] = await profile_async(lambda: ours(dest))
        shutil.rmtree(dest, ignore_errors=True)
    return out


async def _spy_on_presign(stack: Any, work: Path, presign: Any) -> dict[str, Any] | None:
    """Where the Hypha server spends the presigning time: py-spy on it (if installed)."""
    import subprocess

    spy = Path(sys.executable).with_name("py-spy")
    pid = stack.pids.get("hypha")
    if not spy.is_file() or not pid:
        return None
    out = work / "hypha-presign.txt"
    proc = subprocess.Popen(
        [str(spy), "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(1.0)  # py-spy attaches
        await presign()
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not out.is_file():
        return None
    return pyspy_summary(out, keep=("hypha/", "botocore", "aiosqlite", "sqlalchemy"))


def _throughput_ratio(times: dict[str, list[float]]) -> float:
    return summarize(times["raw"]).median / summarize(times["ours"]).median


async def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Start the stack and the service, measure the three parts, stop everything."""
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.deploy.serve import start_service
    from cellpose_finetuning.deploy.testing import start_test_stack
    from cellpose_finetuning.engine.inference import ModelResolver

    set_torch_threads()
    work = Path(cfg["work_dir"])
    data_dir = work / "stack"
    out: dict[str, Any] = {}
    stack = service = None
    conns: list[Any] = []
    try:
        t0 = time.perf_counter()
        stack = await asyncio.to_thread(start_test_stack, data_dir)
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        if cfg["model"]:
            shutil.copy(cfg["model"], data_dir / "models" / f"{MODEL_NAME}.pth")
        token = stack.token(SERVICE_USER, roles=("admin",), workspace=stack.workspace)
        admin, server, service, _info = await start_service(
            stack.server_url,
            token,
            data_dir,
            {"worker_threads": 1},
            stack.workspace,
            s3=stack.s3_access(),  # as `serve` does on the embedded stack
        )
        conns += [admin, server]
        out["startup_s"] = time.perf_counter() - t0
        alice = await connect_to_server(
            {"server_url": stack.server_url, "token": stack.token("alice")}
        )
        pinger = await connect_to_server(
            {"server_url": stack.server_url, "token": stack.token("bench-ping")}
        )
        conns += [alice, pinger]
        await pinger.register_service(
            {
                "id": "bench-ping",
                "config": {"visibility": "public", "require_context": True},
                "ping": lambda context=None: ["cpsam"],
            }
        )
        svc = await alice.get_service(f"{server.config.workspace}/cellpose-finetuning")
        ping = await alice.get_service(f"{pinger.config.workspace}/bench-ping")
        if cfg.get("fetch_only"):
            out["fetch"] = await _fetch(cfg, alice, stack, work)
            return out
        out["rpc"] = await _rpc_overhead(svc, ping, cfg["rpc_calls"])
        resolver = ModelResolver(models_dir=data_dir / "models")
        work_t = []
        for _ in range(200):
            t = time.perf_counter()
            resolver.pretrained_names()
            work_t.append(time.perf_counter() - t)
        out["rpc"]["method_work"] = work_t
        out["infer"] = await _infer(cfg, svc, alice, data_dir)
        out["fetch"] = await _fetch(cfg, alice, stack, work)
    finally:
        t0 = time.perf_counter()
        if service is not None:
            with contextlib.suppress(Exception):
                await service.close()
        for c in {id(c): c for c in conns}.values():
            with contextlib.suppress(Exception):
                await c.disconnect()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
        out["shutdown_s"] = time.perf_counter() - t0
    return out


def stop_leftovers(data_dir: Path) -> list[str]:
    """Stop the servers a killed measuring process left running (from ``stack.pids``)."""
    stopped = []
    try:
        recorded = json.loads((data_dir / "stack.pids").read_text())
    except (OSError, ValueError):
        return stopped
    for name, pid in recorded.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            continue
        if str(data_dir.resolve()) not in cmdline:
            continue  # not ours (the pid was reused)
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not Path(f"/proc/{pid}").exists():
                break
        stopped.append(name)
    return stopped


# --------------------------------------------------------------------------- the case
def run(ctx: Context) -> CaseResult:
    """Run the measuring subprocess and turn its samples into rows."""
    work = ctx.work_dir / "service"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # BENCH_SERVICE_FETCH_ONLY=1: the dataset fetch rows alone (no RPC, no infer)
    fetch_only = os.environ.get("BENCH_SERVICE_FETCH_ONLY") == "1"
    cfg = {
        "work_dir": str(work),
        "model": "" if fetch_only else str(cells_model(ctx)),
        "rpc_calls": 100 if ctx.quick else 400,
        "infer_size": 512 if ctx.quick else 2048,
        "infer_reps": ctx.reps(3),
        "n_files": 300 if ctx.quick else 2500,
        "fetch_reps": ctx.reps(3),
        "profile": ctx.quick,
        "fetch_only": fetch_only,
    }
    try:
        raw, wall = run_python(
            [str(Path(__file__)), json.dumps(cfg)],
            timeout=1500,
            log_path=ctx.log_path("service"),
        )
    finally:
        left = stop_leftovers(work / "stack")
        if left:
            ctx.log(f"  stopped leftover servers: {left}")
    ctx.log(
        f"  stack and service up in {raw['startup_s']:.1f} s, down in {raw['shutdown_s']:.1f} s; "
        f"case subprocess {wall:.0f} s"
    )
    shutil.rmtree(work, ignore_errors=True)
    return _result(cfg, raw)


def _call_rows(cfg: dict[str, Any], raw: dict[str, Any]) -> tuple[list[Row], list[str]]:
    """The per-call and infer rows, and their note."""
    rpc, inf = raw["rpc"], raw["infer"]
    mib = 1024**2
    size = cfg["infer_size"]
    engine = summarize(inf["engine"])
    rows = [
        Row(
            "trivial call over hypha-rpc (`list_pretrained_models` vs a bare `ping`)",
            "s",
            summarize(rpc["ours"]),
            summarize(rpc["ref"]),
            Target("max_value", 0.005),
            note=f"{len(rpc['ours'])} calls each, interleaved in blocks of 25; the method's own "
            f"work (listing the checkpoints folder) takes "
            f"{summarize(rpc['method_work']).median * 1e6:.0f} µs",
        ),
        Row(
            f"infer {size}² float32 ({inf['image_bytes'] / mib:.0f} MiB) sent as an array",
            "s",
            summarize(inf["array"]),
            engine,
            note=f"reference: `segment()` in-process; {inf['n_objects']} objects; the call "
            f"returns {inf['mask_bytes'] / mib:.0f} MiB of labels; masks identical on all "
            f"three paths: {'yes' if inf['same_masks'] else 'NO'}",
        ),
        Row(
            f"infer {size}² read from a dataset artifact (cold cache)",
            "s",
            summarize(inf["artifact"]),
            engine,
            note=f"the service reads the {inf['tif_bytes'] / mib:.0f} MiB TIFF from S3 "
            "(directly, as on the embedded stack), decodes it, segments, returns the labels",
        ),
    ]
    array_extra = summarize(inf["array"]).median - engine.median
    artifact_extra = summarize(inf["artifact"]).median - engine.median
    notes = [
        f"infer: sending the {inf['image_bytes'] / mib:.0f} MiB image and receiving "
        f"{inf['mask_bytes'] / mib:.0f} MiB of labels through hypha-rpc adds "
        f"{array_extra:+.2f} s to the engine's {engine.median:.2f} s; reading the image "
        f"from the artifact instead (S3 read, TIFF decode) adds "
        f"{artifact_extra:+.2f} s. The service and the client share this process and its "
        "cores with Hypha and SeaweedFS, as in the test suite.",
    ]
    return rows, notes


def _result(cfg: dict[str, Any], raw: dict[str, Any]) -> CaseResult:
    fetch = raw["fetch"]
    rows, notes = ([], []) if cfg.get("fetch_only") else _call_rows(cfg, raw)
    n = fetch["n_files"]
    per_file = fetch["bytes"] / n / 1024
    rows += [
        Row(
            f"dataset fetch, {n} files of {per_file:.1f} KiB: throughput, embedded stack",
            "files/s",
            summarize([n / t for t in fetch["ours"]]),
            summarize([n / t for t in fetch["raw"]]),
            Target("min_ratio", 0.8),
            note="ours: `ArtifactFiles.download` as the service runs it on the embedded stack "
            "(files listed and read straight from S3 with the "
            "stack's keys, 16 threads, size checked against the listing) into a fresh cache; "
            "raw: boto3 `get_object` of the same keys, 16 threads, written to disk the same way",
        ),
        Row(
            f"dataset fetch, {n} files: throughput, presigned URLs (external-server path)",
            "files/s",
            summarize([n / t for t in fetch["presigned"]]),
            summarize([n / t for t in fetch["raw"]]),
            note=f"`ArtifactFiles.download` without the direct reader: presigned URLs in "
            f"batches of 100, 4 calls in flight, each batch's 16-way concurrent httpx GETs "
            f"starting as its URLs arrive; asking for the {n} presigned URLs alone takes "
            f"{summarize(fetch['presign']).median:.2f} s",
        ),
        Row(
            f"dataset fetch, {n} files: time, embedded stack",
            "s",
            summarize(fetch["ours"]),
            summarize(fetch["raw"]),
        ),
    ]
    ours_s = summarize(fetch["ours"]).median
    presigned_s = summarize(fetch["presigned"]).median
    presign_s = summarize(fetch["presign"]).median
    raw_s = summarize(fetch["raw"]).median
    notes.append(
        f"Dataset fetch, measured in one run, the three sides interleaved: direct S3 reads "
        f"{ours_s:.2f} s, presigned URLs {presigned_s:.2f} s, raw boto3 {raw_s:.2f} s for "
        f"{n} files. What the direct path adds to raw boto3 is the listing (S3 "
        f"ListObjectsV2, {-(-n // 1000)} pages of 1000) and the cache's bookkeeping (a "
        f"temporary file, the store's mtime and an atomic rename per file). The "
        f"presigned path pays Hypha's signing: {presign_s:.2f} s for the URLs alone "
        f"({presign_s / n * 1e3:.1f} ms a file), because hypha 0.21.137's `get_file` sends "
        f"one S3 HEAD per path, one after the other, before it signs; a list of paths per call "
        f"is already the fewest calls it allows (no bulk or prefix signing), so against an "
        f"external server that cost stays."
    )
    profiles = []
    if "profile" in fetch:
        profiles.append(
            {
                "label": f"dataset fetch of {n} files, `ArtifactFiles.download` with direct "
                "S3 reads (client process only)",
                **fetch["profile"],
            }
        )
    if fetch.get("sniffio") is False and "profile" in fetch:
        notes.append(
            "Client side: httpcore 1.0.9 runs `import sniffio` inside "
            "`current_async_library()` on every request, and sniffio is not installed "
            "here, so every request pays a failed import that searches sys.path (the "
            "`find_spec` and `posix.stat` calls in the client profile below)."
        )
    if "server_profile" in fetch and not fetch["server_profile"]:
        notes.append(
            "py-spy is not installed, so the Hypha server was not profiled: "
            "`.venv/bin/pip install py-spy` and run again to see where presigning goes."
        )
    if fetch.get("server_profile"):
        profiles.append(
            {
                "label": f"the Hypha server while it presigns {n} URLs (`get_file` batches)",
                **fetch["server_profile"],
            }
        )
    return CaseResult(
        id="service",
        title=TITLE,
        ours_label="our service on the embedded stack (SeaweedFS + Hypha on loopback; the "
        "service registered by `deploy.serve.start_service`), called by user alice over "
        f"hypha-rpc; {THREADS} torch threads",
        reference_label="per row: a bare hypha-rpc service, the engine in-process, raw boto3 S3",
        rows=rows,
        notes=notes,
        profiles=profiles,
        details={
            **{k: v for k, v in raw.items() if k != "fetch"},
            "fetch": {k: v for k, v in fetch.items() if k not in ("profile", "server_profile")},
            "config": cfg,
        },
    )


if __name__ == "__main__":
    emit(asyncio.run(measure(json.loads(sys.argv[1]))))
