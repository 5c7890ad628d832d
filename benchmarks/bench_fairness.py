"""Case 6: fairness between users when one of them floods the service.

A measuring subprocess starts the real embedded stack with our service
(``deploy.serve.start_service``, one training slot, one inference slot, as
``serve``'s defaults) and two users over hypha-rpc:

1. **Training.** ``mallory`` starts 3 long trainings (1000 epochs each) of the
   tiny network on the dev data. Once her first run has trained for longer than
   the time slice, ``bob`` starts a 1-epoch training. Measured: how long bob's
   session waits in the queue (from ``waiting`` to its worker being started)
   against the duration of one epoch of mallory's running session. Target:
   bob starts within one of her epochs (ratio ≤ 1).
2. **Inference.** ``mallory`` sends 6 concurrent ``infer`` calls of a
   1024×1024 image; while the first runs, ``bob`` sends one 64×64 call.
   Measured: bob's latency against the duration of one of mallory's large
   calls. Target: bob waits at most one large call (ratio ≤ 1.5: the large
   call he waits for, plus his own small one and the transfer).

Before this case the queue was first come, first served: bob waited for all
three 1000-epoch runs, and his small call for all six large ones (31 s in the
report of issue 16).

Run as a script, this module is the measuring subprocess:
``python benchmarks/bench_fairness.py '<json config>'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import DEV_DATA, CaseResult, Context, Row, Target, emit, run_python, summarize
from fixtures import preset_checkpoint

TITLE = "Fairness between users (one user flooding)"
SERVICE_USER = "cellpose-service"
MODEL_NAME = "tiny"


async def _status(svc: Any, sid: str) -> dict[str, Any]:
    return await svc.get_training_status(sid)


async def _training(cfg: dict[str, Any], mallory: Any, bob: Any, dataset: str) -> dict[str, Any]:
    common = dict(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model=MODEL_NAME,
        learning_rate=1e-4,
    )
    floods = [
        (await mallory.start_training(**common, n_epochs=1000))["session_id"] for _ in range(3)
    ]
    first = floods[0]
    # mallory's first run trains past the time slice (a few epochs at least)
    t_running = None
    while True:
        st = await _status(mallory, first)
        if st["status_type"] == "running" and t_running is None:
            t_running = time.monotonic()
        if (
            t_running is not None
            and time.monotonic() - t_running > cfg["time_slice_s"]
            and (st.get("current_epoch") or 0) >= 2
        ):
            break
        if st["status_type"] in ("failed", "completed"):
            raise RuntimeError(f"mallory's run ended: {st['message']}")
        await asyncio.sleep(0.2)
    before = await _status(mallory, first)
    epoch_s = (before["elapsed_seconds"] or 0) / max(before["current_epoch"] or 1, 1)
    t_submit = time.monotonic()
    sid = (await bob.start_training(**common, n_epochs=1))["session_id"]
    queued_at = started_at = None
    while True:
        st = await _status(bob, sid)
        now = time.monotonic()
        if queued_at is None and st["status_type"] == "waiting":
            queued_at = now
        launched = st["status_type"] == "running" or (
            st["status_type"] == "preparing" and "worker" in (st["message"] or "")
        )
        if launched and queued_at is not None:
            started_at = now
            break
        if st["status_type"] in ("failed", "completed", "stopped"):
            raise RuntimeError(f"bob's run ended before it was seen starting: {st['message']}")
        await asyncio.sleep(0.05)
    while True:
        done = await _status(bob, sid)
        if done["status_type"] in ("completed", "failed"):
            break
        await asyncio.sleep(0.2)
    paused = await _status(mallory, first)
    for s in floods:
        with contextlib.suppress(Exception):
            await mallory.stop_training(s)
    return {
        "epoch_s": epoch_s,
        "wait_s": started_at - queued_at,
        "submit_to_start_s": started_at - t_submit,
        "bob_final": done["status_type"],
        "mallory_epochs_before": before["current_epoch"],
        "mallory_status_while_bob": paused["status_type"],
    }


async def _inference(cfg: dict[str, Any], mallory: Any, bob: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (cfg["large"], cfg["large"]), dtype="uint8")
    small = rng.integers(0, 255, (64, 64), dtype="uint8")
    await mallory.infer(model=MODEL_NAME, input_arrays=[big])  # warm-up: model load, threads
    await bob.infer(model=MODEL_NAME, input_arrays=[small])
    # one large call alone: what bob may have to wait for
    alone = []
    for _ in range(cfg["reps"]):
        t = time.perf_counter()
        await mallory.infer(model=MODEL_NAME, input_arrays=[big])
        alone.append(time.perf_counter() - t)
    bob_latency, small_alone = [], []
    for _ in range(cfg["reps"]):
        t = time.perf_counter()
        await bob.infer(model=MODEL_NAME, input_arrays=[small])
        small_alone.append(time.perf_counter() - t)
        flood = [
            asyncio.ensure_future(mallory.infer(model=MODEL_NAME, input_arrays=[big]))
            for _ in range(6)
        ]
        await asyncio.sleep(min(alone) / 3)  # the first large call is running
        t = time.perf_counter()
        await bob.infer(model=MODEL_NAME, input_arrays=[small])
        bob_latency.append(time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*flood)
        flood_rest = time.perf_counter() - t
    return {
        "large_alone": alone,
        "small_alone": small_alone,
        "bob_latency": bob_latency,
        "flood_rest_s": flood_rest,
    }


async def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Start the stack and the service, measure both parts, stop everything."""
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.client import upload_folder
    from cellpose_finetuning.deploy.serve import start_service
    from cellpose_finetuning.deploy.testing import start_test_stack

    work = Path(cfg["work_dir"])
    data_dir = work / "stack"
    out: dict[str, Any] = {}
    stack = service = None
    conns: list[Any] = []
    try:
        stack = await asyncio.to_thread(start_test_stack, data_dir)
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg["model"], data_dir / "models" / f"{MODEL_NAME}.pth")
        token = stack.token(SERVICE_USER, roles=("admin",), workspace=stack.workspace)
        service_config = {
            "worker_threads": 1,
            "training_time_slice_s": cfg["time_slice_s"],
            "max_active_sessions_per_user": 3,
        }
        admin, server, service, _info = await start_service(
            stack.server_url, token, data_dir, service_config, stack.workspace
        )
        conns += [admin, server]
        sid = f"{server.config.workspace}/cellpose-finetuning"
        users = {}
        for name in ("mallory", "bob"):
            conn = await connect_to_server(
                {"server_url": stack.server_url, "token": stack.token(name)}
            )
            conns.append(conn)
            users[name] = (conn, await conn.get_service(sid))
        dataset = await upload_folder(users["mallory"][0], DEV_DATA, alias="dev", public=True)
        print("training part", file=sys.stderr, flush=True)
        out["training"] = await _training(cfg, users["mallory"][1], users["bob"][1], dataset)
        print(f"training: {out['training']}", file=sys.stderr, flush=True)
        out["inference"] = await _inference(cfg, users["mallory"][1], users["bob"][1])
        print(f"inference: {out['inference']}", file=sys.stderr, flush=True)
    finally:
        if service is not None:
            with contextlib.suppress(Exception):
                await service.close()
        for c in {id(c): c for c in conns}.values():
            with contextlib.suppress(Exception):
                await c.disconnect()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    return out


# --------------------------------------------------------------------------- the case
def run(ctx: Context) -> CaseResult:
    """Run the measuring subprocess and turn its samples into rows."""
    work = ctx.work_dir / "fairness"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = {
        "work_dir": str(work),
        "model": str(preset_checkpoint(ctx, "tiny")),
        "time_slice_s": 10.0,
        "large": 512 if ctx.quick else 1024,
        "reps": ctx.reps(3),
    }
    try:
        raw, _wall = run_python(
            [str(Path(__file__)), json.dumps(cfg)],
            timeout=1500,
            log_path=ctx.log_path("fairness"),
        )
    finally:
        from bench_service import stop_leftovers

        stop_leftovers(work / "stack")
    shutil.rmtree(work, ignore_errors=True)
    return _result(cfg, raw)


def _result(cfg: dict[str, Any], raw: dict[str, Any]) -> CaseResult:
    tr, inf = raw["training"], raw["inference"]
    large = summarize(inf["large_alone"])
    rows = [
        Row(
            "bob's 1-epoch training: wait in the queue (ref: one epoch of mallory's running "
            "session)",
            "s",
            summarize([tr["wait_s"]]),
            summarize([tr["epoch_s"]]),
            Target("max_ratio", 1.0),
            note=f"mallory ran 3 × 1000 epochs; her first run was paused "
            f"({tr['mallory_status_while_bob']} while bob trained) and continued; bob's run "
            f"{tr['bob_final']} {tr['submit_to_start_s']:.1f} s after he asked "
            f"(listing and download of the data included)",
        ),
        Row(
            f"bob's 64×64 infer during 6 concurrent {cfg['large']}² calls of mallory's "
            f"(ref: one {cfg['large']}² call alone)",
            "s",
            summarize(inf["bob_latency"]),
            large,
            Target("max_ratio", 1.5),
            note=f"the same 64×64 call alone: {summarize(inf['small_alone']).median:.2f} s; "
            f"mallory's 6 calls took {inf['flood_rest_s']:.0f} s after bob's answer",
        ),
    ]
    return CaseResult(
        id="fairness",
        title=TITLE,
        ours_label="bob's wait while mallory floods",
        reference_label="one unit of mallory's work",
        rows=rows,
        notes=[
            f"time slice {cfg['time_slice_s']:g} s (`serve --training-time-slice`, default "
            "60 s): bob arrived after mallory's run had used it; with the default he waits "
            "at most the rest of her slice plus one epoch.",
            "one training slot and one inference slot (serve's defaults); tiny network.",
        ],
        details={"raw": raw},
    )


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    emit(asyncio.run(measure(config)))
