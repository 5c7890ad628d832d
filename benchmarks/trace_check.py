"""TorchScript trace of the exported network against eager PyTorch on one 256² tile (#19).

Builds the standard form's network (``export/bioimageio/network.py``, cpsam architecture by
default, random weights) and traces it as bioimageio.core's torchscript converter does
(``torch.jit.trace`` of the module as constructed, no ``.eval()``), once as cellpose's
training-mode forward would be traced (``rdrop`` 0.4, the state before the fix) and once as
the network is built now, and prints max abs / relative differences as JSON. About 20 minutes
for cpsam on 2 busy CPU cores; ``--preset small`` takes seconds.

    python benchmarks/trace_check.py [--preset cpsam] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cellpose_finetuning.engine.models import PRESETS
from cellpose_finetuning.export.bioimageio.network import CellposeSAMFlows


def _diff(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = (out - ref).abs()
    return {
        "max_abs": float(d.max()),
        "max_rel_to_max_ref": float(d.max() / ref.abs().max()),
        "median_abs": float(d.median()),
    }


def _has_rand(traced: torch.jit.ScriptModule) -> bool:
    return "aten::rand" in {n.kind() for n in traced.inlined_graph.nodes()}


def measure(preset: str = "cpsam") -> dict:
    """The differences, seconds per step and whether the trace holds ``aten::rand``."""
    arch = PRESETS[preset]
    kwargs = {
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "global_attn_indexes": arch.global_attn_indexes,
        "in_channels": 1,
    }
    torch.manual_seed(0)
    net = CellposeSAMFlows(**kwargs)
    tile = torch.from_numpy(np.random.default_rng(0).random((1, 1, 256, 256), dtype=np.float32))
    res: dict = {"preset": preset, "built_training": net.training, "built_rdrop": net.rdrop}
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = net.eval()(tile)
        res["eager_s"] = time.perf_counter() - t0
        res["ref_max_abs"], res["ref_std"] = float(ref.abs().max()), float(ref.std())
        # Before the fix: the module came out of its constructor in training mode, rdrop 0.4.
        net.train()
        net.rdrop = 0.4
        traced = torch.jit.trace(net, tile, check_trace=False)
        res["train_trace_has_rand"] = "aten::rand" in {
            n.kind() for n in traced.inlined_graph.nodes()
        }
        res["torchscript_traced_in_train_mode_run1"] = _diff(traced(tile), ref)
        res["torchscript_traced_in_train_mode_run2"] = _diff(traced(tile), ref)
        # Now: the network as constructed (eval mode, rdrop 0).
        fixed = CellposeSAMFlows(**kwargs)
        fixed.load_state_dict(net.state_dict())
        traced = torch.jit.trace(fixed, tile, check_trace=False)
        res["fixed_trace_has_rand"] = "aten::rand" in {
            n.kind() for n in traced.inlined_graph.nodes()
        }
        res["torchscript_fixed"] = _diff(traced(tile), ref)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpsam", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.preset)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
