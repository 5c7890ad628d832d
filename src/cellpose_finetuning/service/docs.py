"""Render the service's API reference (``docs/api.md``) from its method docstrings.

The docstrings are what Hypha shows remote callers, so they are the
reference; this keeps a readable copy in the repository, and a test fails
when the two drift apart. Regenerate with
``python -m cellpose_finetuning.service.docs > docs/api.md``.
"""

from __future__ import annotations

import inspect

from cellpose_finetuning.service.api import CellposeService

__all__ = ["COMPATIBILITY", "render_api_markdown"]

#: How we answer the original hosted service's API (the clients' contract).
COMPATIBILITY = """
## Compatibility with the original service

Every method, argument, default and return key of the original *Cellpose Fine-Tuning*
service (its README and its own clients: the tutorial notebook, the web frontend, the
client and status scripts) is accepted with the original's meaning. The test module
`tests/service/compat/` replays those clients against the real stack. Arguments may also
come as one dict (`svc.method({...}, {_rkwargs: true})` from JavaScript).

| original method and arguments | here | differences |
|---|---|---|
| `infer(artifact, image_paths, input_arrays, model="cpsam", diameter, flow_threshold=0.4, cellprob_threshold=0.0, niter, return_flows=False, return_flows_only=False, json_safe=False, enable_clahe=False)` | same order and defaults | `(H,W,3)` arrays are read as RGB images (the original took them as 3 rows, see below) |
| results `[{"input_path", "output"}]`, `"flows"` with `return_flows`, `{"dP", "cellprob"}` with `return_flows_only`, the PNG payload with `json_safe` | same | cellpose 4.0.7's flows are `[HSV, dP, cellprob]` (no final positions) |
| `start_training(artifact, train_images, train_annotations, metadata_dir, test_images, test_annotations, model="cpsam", n_samples, n_epochs=10, learning_rate=1e-6, weight_decay=1e-4, min_train_masks=5, validation_interval, enable_clahe=False, rescale=False, label)` | same order and defaults, plus our settings as keywords (`get_training_capabilities`) | `n_samples` subsets are seeded (`seed`), so a run can be repeated |
| `model` = a session id or a published model artifact (`ws/alias` or URL) | same, checked against your own read permission | another user's session is "not found" |
| `preflight_training_dataset(artifact, train_images, train_annotations, metadata_dir, test_images, test_annotations, n_samples)` → `ok, train_pair_count, test_pair_count, n_samples_resolved, message` | same, plus `check_masks=False` | `n_samples_resolved` is left out when `n_samples` is not given (never `None`) |
| `get_training_status(session_id)` | same keys: the run's parameters at the top level, `current_batch`, `total_batches`, `current_loss`, `exported_artifact_id`, `model_modified`, `user_id`, `label`, `last_continued_time` | **an unknown session id is an error** (the original answered `waiting`), so a typo is not mistaken for a queued run; optional keys are absent until known, never `None`; plus `stopped` as a status type, `best_epoch`, `settings`, `updated_at` |
| `stop_training(session_id)` | same | stops after the current batch and keeps the weights |
| `restart_training(session_id, n_epochs=None)` → status + `restarted_from` | same | **continues the same session** (same id, optimizer state kept, history appended) instead of copying it to a new one; `restarted_from` is the session's own id |
| `list_training_sessions(status_types, dataset_artifact_ids, labels, limit=50)` → `{session_id: status}` newest first | same | only **your own** sessions (the original listed everyone's) |
| `delete_training_session(session_id)` → `{"deleted": session_id}` | same, plus `session_id` | only your own sessions |
| `debug_task_info(session_id)` | same keys | lists only your own tasks |
| `export_model(session_id, model_name=None, description, authors, uploader, collection="bioimage-io/colab-annotations")` | same, plus `checkpoint`, `license`, `flow_threshold`, `cellprob_threshold` | the default name is `cellpose-<session id>` (unique); a second export of an unchanged session returns the first (as the original), unless you give another `model_name`; `stopped` sessions can be exported too; the package passes BioImage.IO validation |
| `list_models_by_dataset(dataset_id)` | same, plus `collection` | |
| `list_pretrained_models()` | same | also lists the checkpoints the service offers by name |

Deliberate differences, each for a reason:

- **Unknown session ids are errors**, not `waiting`: a client polling a mistyped id would wait forever.
- **`(H,W,3)` arrays are RGB**: the original took a `(H,W,3)` array as 3 rows of `W` channels and
  segmented garbage; a last axis of 3 or 4 with a larger first axis is read as channels.
- **Sessions are private**: status, stop, restart, delete, export, inference with a session id
  and the session list are only for the session's creator (the original let anyone act on any
  session).
- **`restart_training` continues in place**: the same id keeps the whole history and the optimizer
  state, so the loss curve is continuous.
- **Defaults for training stay the original's** (10 epochs, learning rate 1e-6, weight decay 1e-4,
  `min_train_masks=5`); our learning-rate warm-up differs (see the README's "Training settings").
"""


def _signature(func: object) -> str:
    original = getattr(func, "__wrapped__", func)
    sig = inspect.signature(original)
    params = [
        str(p).replace("'", "")
        for name, p in sig.parameters.items()
        if name not in ("self", "context", "extra")
    ]
    return ", ".join(params)


def render_api_markdown() -> str:
    """The API reference as Markdown, one section per service method."""
    lines = [
        "# Service API reference",
        "",
        "Generated from the method docstrings of `CellposeService` "
        "(`python -m cellpose_finetuning.service.docs > docs/api.md`); a test keeps it in sync.",
        "Every method also receives the caller's Hypha context, which decides what they may see.",
        "",
    ]
    lines += COMPATIBILITY.strip("\n").splitlines() + [""]
    for name in sorted(n for n in dir(CellposeService) if not n.startswith("_")):
        func = getattr(CellposeService, name)
        if not getattr(func, "__is_api__", False):
            continue
        doc = inspect.cleandoc(func.__doc__ or "")
        lines += [f"## `{name}({_signature(func)})`", "", doc, ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_api_markdown(), end="")
