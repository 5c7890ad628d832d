"""A training worker and a terminal's Ctrl-C, which reaches every process of its group."""

from __future__ import annotations

import os
import signal

from cellpose_finetuning.engine.runs import create_local_session
from cellpose_finetuning.engine.training import start_worker
from tests.helpers import wait_until


def test_ctrl_c_reaching_the_worker_leaves_the_stop_to_its_parent(
    tmp_path, tiny_model, train_pairs
):
    session = create_local_session(
        out=tmp_path / "run",
        train_pairs=train_pairs[:2],
        test_pairs=(),
        settings={"model": str(tiny_model), "n_epochs": 500},
    )
    worker = start_worker(session, num_threads=1)
    wait_until(lambda: (session.read_status().current_epoch or 0) >= 1)
    os.kill(worker.pid, signal.SIGINT)  # what Ctrl-C sends the worker, beside its parent
    session.request_stop()  # what its parent (serve, train) then does
    status = worker.wait(timeout=60)
    assert status.status_type == "stopped", status.message  # not failed: KeyboardInterrupt
    assert session.weights("last").is_file()
