"""``doc.md``: base model, data, training, validation, usage, license, citation."""

from __future__ import annotations

from typing import Any

from cellpose_finetuning.export.bioimageio.common import (
    INPUT_ID,
    MIN_SPATIAL_SIZE,
    OUTPUT_ID,
    _package_version,
    _Plan,
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _doc(plan: _Plan) -> str:
    m, s, base, arch, kw = plan.metrics, plan.settings, plan.base, plan.arch, plan.inference
    resize = (
        f"the image is resized by 30 / {_fmt(kw['diameter'])} (diameter)"
        if kw["diameter"]
        else "no resizing (diameter = None)"
    )
    lines = [
        f"# {plan.name}",
        "",
        plan.description,
        "",
        "## Base model",
        "",
        f"- **Started from:** {base['name']} — {base['source']}",
        f"- **Architecture:** cellpose `Transformer` with a SAM ViT encoder (preset "
        f"`{arch.name}`: embed_dim {arch.embed_dim}, depth {arch.depth}, heads "
        f"{arch.num_heads}), {plan.n_params:,} parameters",
        f"- **Checkpoint exported:** `{plan.checkpoint}` (`{plan.weights_file}`) of training "
        f"session `{plan.session_id}`",
        "",
        "## Training data",
        "",
        f"- **Training images:** {plan.n_train}",
        f"- **Test (validation) images:** {plan.n_test}",
        f"- **Dataset:** {plan.dataset_id or 'local files (no dataset id)'}",
        f"- **Sample image in this package:** {plan.sample_name}"
        + (
            f", centre-cropped to {plan.sample_shape[-2]}×{plan.sample_shape[-1]}"
            if plan.cropped
            else ""
        ),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in s.items()],
        f"| epochs run | {_fmt(m.get('epochs_run'))} |",
        f"| training time (s) | {_fmt(plan.status.elapsed_seconds)} |",
        "",
        "Training used cellpose 4's own recipe: flows computed from the masks, per-channel "
        "1–99 percentile normalisation, random rotation/flip/scale augmentation on "
        f"{arch.bsize}×{arch.bsize} tiles, cellpose's loss (flow MSE + cell-probability BCE) "
        "and AdamW.",
        "",
    ]
    if plan.has_curves:
        lines += ["![Training curves](training_curves.png)", ""]
    lines += [
        "## Validation",
        "",
        "Metrics recorded during training on the session's test images (pixel metrics: "
        "predicted foreground = cell probability > 0; AP = TP / (TP + FP + FN) after full "
        "cellpose inference, at IoU 0.5/0.75/0.9).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| final train loss | {_fmt(m.get('final_train_loss'))} |",
        f"| best test loss (epoch) | {_fmt(m.get('best_test_loss'))} "
        f"({_fmt(m.get('best_test_loss_epoch'))}) |",
        f"| final test loss | {_fmt(m.get('final_test_loss'))} |",
    ]
    px, im = m.get("pixel_metrics"), m.get("instance_metrics")
    if px:
        lines.append(
            f"| pixel F1 / IoU (epoch {m['pixel_metrics_epoch']}) | "
            f"{_fmt(px['f1'])} / {_fmt(px['iou'])} |"
        )
    if im:
        lines += [
            f"| AP@0.5 / AP@0.75 / AP@0.9 | {_fmt(im['ap_0_5'])} / {_fmt(im['ap_0_75'])} / "
            f"{_fmt(im['ap_0_9'])} |",
            f"| objects true / predicted | {im['n_true']} / {im['n_pred']} |",
        ]
    if not (px or im or m.get("best_test_loss") is not None):
        lines.append("| test metrics | none recorded (no test images) |")
    lines += [
        "",
        "To validate on your own data, segment annotated images that were not used for "
        "training and compare with `cellpose.metrics.average_precision`.",
        "",
    ]
    lines += (
        _doc_standard_usage(plan)
        if plan.format == "standard"
        else [
            "## Input and output",
            "",
            f"- **Input `{INPUT_ID}`:** `(batch, channel, y, x)` float32, **raw** intensities "
            f"(any range), {plan.n_channels} channel(s), any height and width "
            f"≥ {MIN_SPATIAL_SIZE} px. Do not normalise: the model does it.",
            f"- **Output `{OUTPUT_ID}`:** `(batch, channel=1, y, x)` int32 instance labels, "
            "0 = background, same height and width as the input.",
            "",
            "## Pre- and post-processing (inside the model)",
            "",
            "`model.py` runs cellpose's complete `CellposeModel.eval`, so the rdf lists no "
            "separate processing steps:",
            "",
            "1. each channel is rescaled so that its 1st and 99th percentiles map to 0 and 1 "
            "(cellpose `normalize99`, per image); fewer than 3 channels are zero-padded, more "
            "are cut to the first 3;",
            f"2. {resize};",
            f"3. the network runs on overlapping {arch.bsize}×{arch.bsize} tiles (overlap "
            f"{kw['tile_overlap']}), so images of any size work; run it on whole images, not "
            "on tiles cut by the caller (labels would not match across tiles);",
            f"4. cellpose flow dynamics ({kw['niter'] or 200} steps) turn flows and cell "
            f"probability into masks: cell probability threshold {kw['cellprob_threshold']}, "
            f"flow error threshold {kw['flow_threshold']}, objects smaller than "
            f"{kw['min_size']} px removed.",
            "",
            "## How to use",
            "",
            "With bioimageio.core (in the environment of `environment.yaml`):",
            "",
            "```python",
            "import numpy as np",
            "from bioimageio.core import load_model_description, predict",
            "",
            'model = load_model_description("model.zip")',
            f'image = np.load("input_sample.npy")  # (1, {plan.n_channels}, H, W) float32, raw',
            f'labels = predict(model=model, inputs={{"{INPUT_ID}": image}})'
            f'.members["{OUTPUT_ID}"].data',
            "```",
            "",
            "Or in plain Python, from the unpacked files:",
            "",
            "```python",
            "import numpy as np, torch, yaml",
            "from model import CellposeSAMSegmenter",
            "",
            'rdf = yaml.safe_load(open("rdf.yaml"))',
            'net = CellposeSAMSegmenter(**rdf["weights"]["pytorch_state_dict"]["architecture"]'
            '["kwargs"])',
            'net.load_state_dict(torch.load("model_weights.pth", weights_only=True))',
            'labels = net.eval().segment(np.load("input_sample.npy")[0])  # (H, W) int32',
            "```",
        ]
    )
    if arch.is_cpsam:
        lines += [
            "",
            "`model_weights.pth` is a plain cellpose state dict, so cellpose itself can use "
            "it: `cellpose.models.CellposeModel(pretrained_model='model_weights.pth')`.",
        ]
    lines += [
        "",
        "## Limitations",
        "",
        f"- Fine-tuned on {plan.n_train} image(s): expect it to work on images like those, "
        "not in general. Check results by eye before relying on them.",
        "- 2D only (run 3D stacks plane by plane).",
        "- Label numbers are arbitrary; on other hardware a few boundary pixels may differ.",
        "",
        "## License",
        "",
        f"These weights are released under **{plan.license}**. {base['notes']} "
        "cellpose's code is BSD-3-Clause (HHMI); `model.py` imports it. Check that the "
        "license of the training images allows sharing a model trained on them.",
        "",
        "## Citation",
        "",
        *[
            f"- {c['text']} " + (f"doi:{c['doi']}" if c.get("doi") else c.get("url", ""))
            for c in plan.cite
        ],
        "",
        f"Exported by cellpose-finetuning {_package_version()} on {plan.timestamp}.",
        "",
    ]
    if plan.documentation:
        lines = [plan.documentation.rstrip(), "", "---", "", *lines]
    return "\n".join(lines)


def _doc_standard_usage(plan: _Plan) -> list[str]:
    """Input, output, processing and usage of a standard-form package."""
    from cellpose_finetuning.export.bioimageio import standard as std

    kw, bsize = plan.inference, plan.arch.bsize
    low, high = std.PERCENTILES
    formats = ", ".join(f"`{f}`" for f in ("pytorch_state_dict", *plan.weights))
    return [
        "## Input and output",
        "",
        f"- **Input `{INPUT_ID}`:** `(batch, channel, y, x)` float32 tiles of exactly "
        f"{bsize}×{bsize} px, **raw** intensities (any range), {plan.n_channels} channel(s).",
        f"- **Output `{OUTPUT_ID}`:** `(batch, channel=1, y, x)` {std.LABELS_DTYPE} instance "
        f"labels, 0 = background; the output declares a halo of {std.HALO} px per side.",
        f"- **Weights:** {formats} (the converted ones name `pytorch_state_dict` as parent).",
        "",
        "## Pre- and post-processing (bioimage.io steps)",
        "",
        "The package holds only Cellpose-SAM's network; the rest of cellpose's pipeline is "
        "described with the spec's own steps:",
        "",
        f"1. `scale_range` (preprocessing): each channel of each image is rescaled so its "
        f"{low:g}th and {high:g}th percentiles map to 0 and 1 (cellpose `normalize99`); "
        "missing channels are filled with zeros inside the network, as cellpose does;",
        f"2. the network gives Y flow, X flow and cell probability for each {bsize} px tile; "
        f"consumers tile larger images with the {std.HALO} px halo (bioimage.io pads the "
        f"image border with `{std.PAD_MODE}`); pad images smaller than {bsize} px first;",
        "3. `cellpose_flow_dynamics` (postprocessing, bioimageio.core ≥ 0.11 with cellpose "
        f"installed): 200 steps of flow dynamics; cell probability threshold "
        f"{kw['cellprob_threshold']}, flow error threshold {kw['flow_threshold']}, objects "
        f"smaller than {kw['min_size']} px removed.",
        "",
        "Differences from `cellpose` itself: cellpose blends overlapping tiles and pads the "
        "border with zeros after normalising, so masks can differ near tile seams and the "
        "image border; images are used at their own scale (no diameter resizing).",
        "",
        "## How to use",
        "",
        "With bioimageio.core ≥ 0.11 (in the environment of `environment.yaml`):",
        "",
        "```python",
        "import numpy as np",
        "from bioimageio.core import create_prediction_pipeline, load_model_description, predict",
        "",
        'model = load_model_description("model.zip")',
        f"image = ...  # (1, {plan.n_channels}, H, W) float32, raw; H, W >= {bsize}",
        "labels = predict(",
        "    model=create_prediction_pipeline(model),",
        f'    inputs={{"{INPUT_ID}": image}},',
        "    blocksize_parameter=0,  # tile it",
        f').members["{OUTPUT_ID}"].data',
        "```",
        "",
        "`model_weights.pth` is a plain cellpose state dict of the network: "
        "`cellpose-finetuning infer --model model.zip` segments with cellpose's own `eval`.",
    ]
