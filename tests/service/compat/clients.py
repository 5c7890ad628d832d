"""The status-reading logic of the original service's clients, to replay against ours.

Two kinds:

- The contract's (``../shared/seed``, our API contract) two examples, copied
  verbatim as functions: the Quick Start monitor loop's body and the
  "accessing all status information" example.
- The original app's own clients (its ``tests/apps/cellpose/test_service.py``
  and ``check_status.py``, its tutorial notebook), written afresh here: the
  same keys read the same way (``in`` checks, ``float()`` on values, ``> 0``
  filters, f-string formats), so a status that would crash them crashes here.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from typing import Any


def seed_quick_start_line(status: dict[str, Any]) -> str:
    """The seed's Quick Start monitor loop body, verbatim (without the sleep)."""
    # Build progress message with all available info
    msg = f"[{status['status_type']}] {status['message']}"

    # Add epoch progress if available
    if "current_epoch" in status and "total_epochs" in status:
        msg += f" | Epoch: {status['current_epoch']}/{status['total_epochs']}"
    # Add elapsed time if available
    if "elapsed_seconds" in status:
        msg += f" | Time: {status['elapsed_seconds']:.1f}s"
    # Add latest training loss if available
    if status.get("train_losses"):
        losses = [l for l in status["train_losses"] if l is not None and l > 0]  # noqa: E741
        if losses:
            msg += f" | Train Loss: {losses[-1]:.4f}"
    # Add validation metrics if available
    if status.get("test_metrics"):
        last_metrics = next((m for m in reversed(status["test_metrics"]) if m), None)
        if last_metrics:
            msg += f" | Val F1: {last_metrics['f1']:.4f}, IoU: {last_metrics['iou']:.4f}"
    print(msg)
    return msg


def seed_status_report(status: dict[str, Any]) -> str:
    """The seed's "accessing all status information" example, verbatim; returns its output."""
    out = io.StringIO()
    with redirect_stdout(out):
        # Dataset information
        print(f"Training samples: {status.get('n_train', 'N/A')}")
        print(f"Test samples: {status.get('n_test', 'N/A')}")
        # Training progress
        if "current_epoch" in status:
            print(f"Progress: {status['current_epoch']}/{status['total_epochs']} epochs")
            print(f"Elapsed time: {status['elapsed_seconds']:.1f}s")
        # Loss history
        if status.get("train_losses"):
            train_losses = status["train_losses"]
            test_losses = status["test_losses"]
            # Filter non-zero losses
            valid_losses = [l for l in train_losses if l > 0]  # noqa: E741
            if valid_losses:
                print(f"Latest training loss: {valid_losses[-1]:.4f}")
                print(f"Initial loss: {valid_losses[0]:.4f}")
            # test_losses uses None for skipped epochs
            valid_test = [l for l in test_losses if l is not None]  # noqa: E741
            if valid_test:
                print(f"Latest val loss: {valid_test[-1]:.4f}")
        # Instance metrics (computed at end of training)
        if status.get("instance_metrics"):
            im = status["instance_metrics"]
            print(f"AP@0.5={im['ap_0_5']}, AP@0.75={im['ap_0_75']}, AP@0.9={im['ap_0_9']}")
            print(f"Ground-truth cells: {im['n_true']}, Predicted cells: {im['n_pred']}")
    return out.getvalue()


def original_cli_monitor_line(status: dict[str, Any]) -> str:
    """What the original's client script prints per poll (its ``monitor_training``)."""
    parts = [f"[{status['status_type']}]", status.get("message", "")]
    if "current_epoch" in status and "total_epochs" in status:
        parts.append(f"| Epoch: {status['current_epoch']}/{status['total_epochs']}")
    if "elapsed_seconds" in status:
        parts.append(f"| Time: {float(status['elapsed_seconds']):.1f}s")
    if status.get("train_losses"):
        train = [float(x) for x in status["train_losses"] if float(x) > 0]
        if train:
            parts.append(f"| Train Loss: {train[-1]:.4f}")
    if status.get("test_losses"):
        val = [float(x) for x in status["test_losses"] if x is not None]
        if val:
            parts.append(f"| Val Loss: {val[-1]:.4f}")
    if status.get("test_metrics"):
        latest = next((m for m in reversed(status["test_metrics"]) if m), None)
        if latest:
            shown = [
                f"{k}={float(latest[k]):.4f}"
                for k in ("pixel_accuracy", "precision", "recall", "f1", "iou")
                if k in latest and latest[k] is not None
            ]
            parts.append("| Val: " + ", ".join(shown))
    if status.get("instance_metrics"):
        parts.append(f"| Instance AP@0.5={status['instance_metrics'].get('ap_0_5', 0):.4f}")
    return " ".join(parts)


def original_metrics_table(session_id: str, status: dict[str, Any]) -> str:
    """The per-epoch TSV the original's client script writes at completion."""
    train = [float(x) for x in status["train_losses"]]
    test_raw = status.get("test_losses")
    test = (
        [float(x) if x is not None else None for x in test_raw]
        if isinstance(test_raw, list)
        else None
    )
    metrics = status.get("test_metrics") if isinstance(status.get("test_metrics"), list) else None
    rows = ["Epoch\tTrain Loss\tVal Loss\tVal F1\tVal IoU"]
    for i, loss in enumerate(train):
        val = test[i] if test is not None and i < len(test) and test[i] is not None else "N/A"
        m = metrics[i] if metrics and i < len(metrics) and metrics[i] else None
        f1 = m.get("f1", "N/A") if m else "N/A"
        iou = m.get("iou", "N/A") if m else "N/A"
        rows.append(f"{i + 1}\t{loss}\t{val}\t{f1}\t{iou}")
    return "\n".join(rows)


def original_check_status_report(session_id: str, status: dict[str, Any]) -> str:
    """What the original's ``check_status`` script prints for a session."""
    lines = [f"Training Session: {session_id}", f"Status: {status['status_type']}"]
    lines.append(f"Message: {status['message']}")
    if status.get("train_losses"):
        train = [x for x in status["train_losses"] if x > 0]
        if train:
            lines.append(f"Total epochs: {len(train)}")
            lines.append(f"Initial train loss: {train[0]:.4f}")
            lines.append(f"Current train loss: {train[-1]:.4f}")
            lines.append(f"Improvement: {(train[0] - train[-1]):.4f}")
            if status.get("test_losses"):
                test_losses = status["test_losses"]
                tested = [x for x in test_losses if x > 0]
                if tested:
                    lines.append(f"Latest test loss: {tested[-1]:.4f}")
            for i, loss in enumerate(train):
                line = f"Epoch {i + 1}: train={loss:.4f}"
                if i < len(test_losses) and test_losses[i] > 0:
                    line += f", test={test_losses[i]:.4f}"
                lines.append(line)
    else:
        lines.append("No training metrics available yet.")
    return "\n".join(lines)


def notebook_monitor_line(status: dict[str, Any]) -> str:
    """The tutorial notebook's polling cell, per poll."""
    line = f"[{status['status_type']}] {status['message']}"
    if "n_train" in status:
        line += f" | Train: {status['n_train']} samples"
    if "current_epoch" in status and "total_epochs" in status:
        line += f" | Epoch: {status['current_epoch']}/{status['total_epochs']}"
    if "elapsed_seconds" in status:
        line += f" | Time: {status['elapsed_seconds']:.1f}s"
    if status.get("train_losses"):
        nonzero = [x for x in status["train_losses"] if x > 0]
        if nonzero:
            line += f" | Train Loss: {nonzero[-1]:.4f}"
    return line


ALL_FORMATTERS = (
    seed_quick_start_line,
    seed_status_report,
    original_cli_monitor_line,
    notebook_monitor_line,
)
