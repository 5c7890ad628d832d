"""The original web frontend's call sequence, through the hypha-rpc JS client under Node.js.

The frontend calls every method as ``svc.method({...}, {_rkwargs: true})``
(the dict arrives as one positional argument), sends ``metadata_dir: null``
and ``n_samples: null``, reads ``list_training_sessions()`` as a dict keyed
by session id, and draws ``json_safe`` inference results from a PNG payload.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellpose_finetuning.client import upload_folder
from cellpose_finetuning.web import static_dir

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed"),
]


async def test_frontend_calls_work_unchanged(running_stack, dev_data, tmp_path, learned_model):
    server = await running_stack.connect("erin")
    try:
        dataset = await upload_folder(server, dev_data, alias="frontend-data")
    finally:
        await server.disconnect()
    png = tmp_path / "probe.png"
    img = np.zeros((96, 120, 3), "uint8")
    img[20:50, 30:70] = 180
    Image.fromarray(img).save(png)
    args = {
        "hypha_rpc": (
            static_dir() / "vendor" / "hypha-rpc" / "hypha-rpc-websocket.min.mjs"
        ).as_uri(),
        "server_url": running_stack.server_url,
        "token": running_stack.token("erin"),
        "service_id": running_stack.service_id,
        "dataset": dataset,
        "png": str(png),
        "model": learned_model,
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    script = Path(__file__).with_name("frontend_calls.mjs")
    # The service answers from this test's event loop: wait for Node without blocking it.
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--experimental-websocket",
        str(script),
        str(tmp_path / "args.json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    out = json.loads(stdout.decode().strip().splitlines()[-1])
    assert "error" not in out, out
    steps = {s["name"]: s["value"] for s in out["steps"]}
    sid = steps["start_training"]["session_id"]
    assert steps["start_training"]["status_type"] in ("preparing", "waiting")
    assert sid in steps["list_keys"]
    assert steps["final_status"]["status_type"] == "completed", steps["final_status"]
    assert steps["final_status"]["epochs"] == 2
    infer = steps["infer"]
    assert infer["encoding"] == "mask_png_base64" and infer["input_path"] == "probe.png"
    assert (infer["width"], infer["height"]) == (120, 96) and infer["png_head"] == "iVBORw0K"
    assert isinstance(infer["object_count"], int)
    assert steps["restart"] == {"session_id": sid, "restarted_from": sid}
    assert steps["after_stop"] in ("stopped", "completed")
    assert steps["export"]["status"] == "exported"
    assert steps["export"]["model_name"] == f"cellpose-{sid}".lower()
