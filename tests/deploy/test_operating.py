"""Operating ``cellpose-finetuning serve`` as a supervisor would: signals, health, logs.

Each test runs the real command in a subprocess whose standard output is a
pipe (as under systemd or Docker, not a terminal), waits for its readiness
line, sends a signal to that one process (as ``systemctl stop`` with
``KillMode=mixed`` and ``docker stop`` do) and then checks that every process
it had started is gone, that its ports and the data directory's lock are
free, and that it exited with 0 and its one-line summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cellpose_finetuning.deploy.ray_leftovers import RAY_PIDS_FILE, stop_ray_leftovers
from cellpose_finetuning.deploy.serve import mask_token
from cellpose_finetuning.deploy.stack import port_is_free
from cellpose_finetuning.deploy.stack.connection import CONNECTION_KEYS
from cellpose_finetuning.deploy.testing import test_stack_config

pytestmark = pytest.mark.stack

START_TIMEOUT = 240  # s; Ray and the stack on 2 busy cores
#: --backend ray with the smallest footprint: one replica, one CPU each.
RAY_ARGS = (
    "--backend",
    "ray",
    "--ray-num-cpus",
    "2",
    "--replica-cpus",
    "0.5",
    "--training-cpus",
    "1",
)


class Served:
    """``cellpose-finetuning serve`` in a subprocess, its output read line by line."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.config = test_stack_config(data_dir)
        c = self.config
        cmd = [
            sys.executable,
            "-c",
            "from cellpose_finetuning.cli import main; main()",
            "serve",
            "--data-dir",
            str(data_dir),
            "--hypha-port",
            str(c.hypha_port),
            "--s3-port",
            str(c.s3_port),
            "--weed-master-port",
            str(c.weed_master_port),
            "--weed-volume-port",
            str(c.weed_volume_port),
            "--weed-filer-port",
            str(c.weed_filer_port),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.started: list[psutil.Process] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("Press Ctrl-C"):
                self.ready.set()
        self.ended.set()
        self.ready.set()  # wake a waiter: it sees the exit

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        """Wait for the readiness line; the connection file's contents."""
        assert self.ready.wait(timeout), f"serve not ready in {timeout} s:\n{self.output}"
        assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}):\n{self.output}"
        return json.loads((self.data_dir / "connection.json").read_text())

    def children(self) -> list[psutil.Process]:
        """Every process serve has started and that runs now (servers, Ray, workers)."""
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        self.started.extend(p for p in procs if p.pid not in {q.pid for q in self.started})
        return procs

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 180) -> float:
        """Send ``sig``; wait for the exit (seconds it took)."""
        self.children()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        assert self.ended.wait(10), "serve's output did not close"
        return time.monotonic() - t0

    def kill(self) -> None:
        """After a failure: kill serve and everything it started."""
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.children()
            self.proc.kill()
            self.proc.wait(30)
        for proc in self.started:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.proc.stdout.close()


def assert_nothing_left(served: Served) -> None:
    """No process serve started runs, its ports and the lock are free, its files gone."""
    _, alive = psutil.wait_procs(served.started, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}\n{served.output}"
    for _, port, what in served.config.port_plan():
        assert port_is_free(port), f"{what} port {port} is still taken"
    fd = os.open(served.data_dir / "stack.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a stack still holds it
    finally:
        os.close(fd)
    for name in ("connection.json", "stack.pids", RAY_PIDS_FILE):
        assert not (served.data_dir / name).exists(), name


def _summary(served: Served) -> str:
    lines = [line for line in served.lines if line.startswith("cellpose-finetuning stopped")]
    assert len(lines) == 1, served.output
    return lines[0]


def _health(data_dir: Path) -> tuple[int, dict]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cellpose_finetuning.cli import main; main()",
            "health",
            "--data-dir",
            str(data_dir),
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def serve_process(tmp_path):
    """Start ``serve`` with the given arguments; everything is killed if a test fails."""
    started: list[Served] = []

    def start(*args: str, data_dir: Path | None = None) -> Served:
        served = Served(data_dir or tmp_path / f"serve-{len(started)}", *args)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None or any(p.is_running() for p in served.started):
            served.kill()


# --------------------------------------------------------------------------- default suite
def test_sigterm_stops_serve_and_everything_it_started_and_no_token_is_printed(serve_process):
    served = serve_process()
    conn = served.wait_ready()
    names = {p.name() for p in served.children()}
    assert {"weed"} <= names and len(names) >= 2, names  # SeaweedFS and Hypha (python)

    # Not a terminal: the token is masked, and is nowhere in what a supervisor logs.
    token = conn["token"]
    assert token and token not in served.output
    assert mask_token(token) in served.output
    assert str(served.data_dir / "connection.json") in served.output
    assert (served.data_dir / "connection.json").stat().st_mode & 0o077 == 0
    # serve writes the stack's keys, filled in: one writer, one set of keys
    assert tuple(conn) == CONNECTION_KEYS
    assert conn["collection"] == "bioimage-io/colab-annotations"
    assert conn["full_service_id"].endswith(":cellpose-finetuning")
    assert conn["page_url"] and conn["s3_endpoint"] and conn["backend"] == "local"
    for log_file in (served.data_dir / "logs").iterdir():
        assert token not in log_file.read_text(errors="replace"), log_file

    seconds = served.stop(signal.SIGTERM)
    assert served.proc.returncode == 0, served.output
    assert "stopped on SIGTERM" in _summary(served)
    assert "Hypha and SeaweedFS stopped" in _summary(served)
    assert "Traceback" not in served.output
    assert token not in served.output
    assert_nothing_left(served)
    print(f"serve (local) stopped on SIGTERM in {seconds:.1f} s")


def test_health_reports_each_part_and_sigint_stops_with_s3_dead(serve_process):
    served = serve_process()
    served.wait_ready()
    code, report = _health(served.data_dir)
    assert code == 0, report
    assert report["ok"] is True
    assert {name: part["ok"] for name, part in report["parts"].items()} == {
        "serve": True,
        "hypha": True,
        "s3": True,
        "service": True,
    }

    weed = json.loads((served.data_dir / "stack.pids").read_text())["weed"]
    served.children()
    os.killpg(weed, signal.SIGKILL)  # SeaweedFS alone dies
    psutil.wait_procs([p for p in served.started if p.pid == weed], timeout=10)
    code, report = _health(served.data_dir)
    assert code == 1, report
    parts = report["parts"]
    assert report["ok"] is False
    assert parts["s3"]["ok"] is False and parts["s3"]["error"]
    assert parts["hypha"]["ok"] is True
    assert parts["service"]["ok"] is True
    assert parts["serve"]["ok"] is True

    served.stop(signal.SIGINT)
    assert served.proc.returncode == 0, served.output
    assert "stopped on SIGINT" in _summary(served)
    assert_nothing_left(served)
    code, report = _health(served.data_dir)  # nothing serves any more
    assert code == 1 and "connection.json" in report["error"]


@pytest.mark.slow  # 109 s on 2 busy cores: Ray's start and stop
def test_sigterm_stops_serve_on_the_ray_backend_and_ray_with_it(serve_process):
    served = serve_process(*RAY_ARGS)
    served.wait_ready()
    names = {p.name() for p in served.children()}
    assert {"raylet", "gcs_server", "weed"} <= names, names
    assert (served.data_dir / RAY_PIDS_FILE).is_file()

    seconds = served.stop(signal.SIGTERM)
    assert served.proc.returncode == 0, served.output
    summary = _summary(served)
    assert "stopped on SIGTERM" in summary and "Ray shut down" in summary, summary
    assert "SIGTERM received" not in served.output  # Ray's native handler did not run
    assert_nothing_left(served)
    print(f"serve (ray) stopped on SIGTERM in {seconds:.1f} s")


def test_ray_processes_recorded_by_a_killed_serve_are_stopped_and_others_left_alone(tmp_path):
    """What the next start does with ``ray.pids`` (real processes, no Ray needed)."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print('ready', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert parent.stdout.readline().strip() == "ready"
        root = psutil.Process(parent.pid)
        (worker,) = root.children()
        other = psutil.Process(bystander.pid)
        records = [
            {"pid": root.pid, "create_time": root.create_time(), "name": root.name()},
            # the bystander's pid, but a different start time: a reused pid
            {"pid": other.pid, "create_time": other.create_time() - 100, "name": "raylet"},
        ]
        (tmp_path / RAY_PIDS_FILE).write_text(json.dumps(records))
        assert stop_ray_leftovers(tmp_path, grace=5) == 2  # the root and its worker
        assert not root.is_running() or root.status() == psutil.STATUS_ZOMBIE
        psutil.wait_procs([worker], timeout=5)
        assert not worker.is_running()
        assert other.is_running()
        assert not (tmp_path / RAY_PIDS_FILE).exists()
        assert stop_ray_leftovers(tmp_path) == 0  # nothing recorded: nothing to do
    finally:
        for proc in (parent, bystander):
            proc.kill()
            proc.wait()
        parent.stdout.close()


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_sighup_then_a_second_signal_stops_at_once_leaving_nothing(serve_process):
    served = serve_process()
    served.wait_ready()
    served.children()
    served.proc.send_signal(signal.SIGHUP)
    # The second signal as soon as the first was taken (its line on the output).
    deadline = time.monotonic() + 30
    while "SIGHUP: stopping" not in served.output and time.monotonic() < deadline:
        time.sleep(0.05)
    seconds = served.stop(signal.SIGTERM, timeout=60)
    assert served.proc.returncode == 0, served.output
    summary = _summary(served)
    assert "stopped on SIGHUP" in summary and "killed" in summary, summary
    assert_nothing_left(served)
    assert seconds < 15, f"a forced stop took {seconds:.1f} s"


@pytest.mark.slow
def test_sigint_stops_serve_on_the_ray_backend(serve_process):
    served = serve_process(*RAY_ARGS)
    served.wait_ready()
    served.stop(signal.SIGINT)
    assert served.proc.returncode == 0, served.output
    assert "stopped on SIGINT" in _summary(served)
    assert_nothing_left(served)


@pytest.mark.slow
def test_ray_left_by_a_sigkilled_serve_is_stopped_at_the_next_start(serve_process, tmp_path):
    data_dir = tmp_path / "killed"
    served = serve_process(*RAY_ARGS, data_dir=data_dir)
    served.wait_ready()
    served.children()
    served.proc.kill()  # no handler, no cleanup
    served.proc.wait(30)
    # Ray's head processes die with it (Ray asks the kernel for that), but the
    # raylet's agents, Hypha and SeaweedFS keep running.
    survivors = [p for p in served.started if p.is_running() and p.status() != "zombie"]
    ray_survivors = [p for p in survivors if p.name().startswith("ray::")]
    assert len(survivors) >= 2, [(p.pid, p.name()) for p in survivors]
    again = serve_process(*RAY_ARGS, data_dir=data_dir)
    again.wait_ready()
    alive = [p for p in survivors if p.is_running() and p.status() != "zombie"]
    assert not alive, [(p.pid, p.name()) for p in alive]
    if ray_survivors:
        assert "Ray processes left running by an earlier serve" in again.output
    again.stop(signal.SIGTERM)
    assert again.proc.returncode == 0, again.output
    assert_nothing_left(again)


@pytest.mark.slow
async def test_sigterm_during_a_ray_training_keeps_its_weights_across_a_restart(
    serve_process, tmp_path, tiny_model, dev_data
):
    from hypha_rpc import connect_to_server

    from cellpose_finetuning.client import upload_folder

    data_dir = tmp_path / "training"
    (data_dir / "models").mkdir(parents=True)
    shutil.copy(tiny_model, data_dir / "models" / "tiny.pth")
    served = serve_process(*RAY_ARGS, data_dir=data_dir)
    conn = await asyncio.to_thread(served.wait_ready)
    server = await connect_to_server({"server_url": conn["server_url"], "token": conn["token"]})
    svc = await server.get_service(conn["service_id"])
    dataset = await upload_folder(server, dev_data, alias="sigterm-data")
    started = await svc.start_training(
        artifact=dataset,
        train_images="images/train/",
        train_annotations="annotations/train/",
        model="tiny",
        n_epochs=500,
        learning_rate=1e-3,
    )
    sid = started["session_id"]
    deadline = time.monotonic() + 300
    while (await svc.get_training_status(sid)).get("current_epoch", 0) < 1:
        assert time.monotonic() < deadline, "no epoch done in 300 s"
        await asyncio.sleep(0.3)  # the status has no event to wait on
    await server.disconnect()

    await asyncio.to_thread(served.stop, signal.SIGTERM)
    assert served.proc.returncode == 0, served.output
    assert "1 training stopped with its weights" in _summary(served), _summary(served)
    assert_nothing_left(served)
    status = json.loads((data_dir / "sessions" / sid / "status.json").read_text())
    assert status["status_type"] == "stopped", status["message"]
    assert (data_dir / "sessions" / sid / "weights" / "last.pth").is_file()

    again = serve_process(data_dir=data_dir)  # restarted (local backend: faster)
    conn = await asyncio.to_thread(again.wait_ready)
    server = await connect_to_server({"server_url": conn["server_url"], "token": conn["token"]})
    try:
        svc = await server.get_service(conn["service_id"])
        after = await svc.get_training_status(sid)
        assert after["status_type"] == "stopped"
        assert after["train_losses"] == status["train_losses"]
        result = await svc.infer(model=sid, input_arrays=[__import__("numpy").zeros((64, 64))])
        assert result[0]["output"].shape == (64, 64)
    finally:
        await server.disconnect()
    await asyncio.to_thread(again.stop, signal.SIGTERM)
    assert again.proc.returncode == 0
    assert_nothing_left(again)


_CLUSTER = """
import json, sys
import ray
ray.init(num_cpus=2, include_dashboard=False, namespace="cluster-owner")
print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
for line in sys.stdin:
    from ray import serve
    apps = serve.status().applications
    print(json.dumps({"apps": sorted(apps), "nodes": len(ray.nodes())}), flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_sigterm_with_ray_address_removes_only_our_application(serve_process):
    """On a joined cluster only the service's Serve application goes; the cluster stays."""
    cluster = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = json.loads(cluster.stdout.readline())["address"]
        served = serve_process(
            "--backend", "ray", "--ray-address", address, "--replica-cpus", "0.5"
        )
        served.wait_ready()
        names = {p.name() for p in served.children()}
        assert "raylet" not in names and "gcs_server" not in names  # the cluster's, not ours
        cluster.stdin.write("status\n")
        cluster.stdin.flush()
        assert json.loads(cluster.stdout.readline())["apps"] == ["cellpose-finetuning"]

        served.stop(signal.SIGTERM)
        assert served.proc.returncode == 0, served.output
        assert "Serve application removed" in _summary(served), _summary(served)
        assert_nothing_left(served)
        cluster.stdin.write("status\n")
        cluster.stdin.flush()
        after = json.loads(cluster.stdout.readline())  # the cluster still answers
        assert after["apps"] == [] and after["nodes"] == 1
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
        cluster.stdout.close()
