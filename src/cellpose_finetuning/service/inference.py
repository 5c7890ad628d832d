"""The service's segmentation methods: ``infer``, ``evaluate`` and the annotation-file helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellpose_finetuning.data.pairing import (
    check_specs,
    pair_files,
    safe_relpath,
)
from cellpose_finetuning.engine.inference import (
    Segmentation,
    blockwise_size,
    check_input_size,
    lazy_2d_shape,
)
from cellpose_finetuning.engine.schemas import INFERENCE_DEFAULTS as INF
from cellpose_finetuning.engine.schemas import (
    InferenceSettings,
)
from cellpose_finetuning.errors import (
    Forbidden,
    InvalidInput,
    ResourceLimit,
)
from cellpose_finetuning.io.images import read_image, to_canonical
from cellpose_finetuning.io.output_names import output_stem
from cellpose_finetuning.service.auth import (
    caller_from_context,
    readable_artifact,
)
from cellpose_finetuning.service.base import ServiceBase
from cellpose_finetuning.service.edge import (
    api_method,
    public_error,
    scrub_paths,
)
from cellpose_finetuning.service.jobs import (
    RESULT_PREFIX,
    InferenceJob,
    InferenceJobs,
    compress_labels,
)
from cellpose_finetuning.service.payloads import (
    encode_mask_png,
)

__all__ = ["InferenceMethods", "blockwise_shape"]


def blockwise_shape(path: Path, settings: InferenceSettings, name: str) -> tuple[int, ...] | None:
    """The (C, H, W) shape of an artifact image segmented block-wise from disk (as a job).

    None for one pass. 2D TIFF/OME-TIFF/Zarr images only (read lazily), by the
    engine's rule (:func:`~cellpose_finetuning.engine.inference.blockwise_size`).
    """
    shape = lazy_2d_shape(path)
    if shape is None or blockwise_size(shape, settings, name=name) is None:
        return None
    return shape


class InferenceMethods(ServiceBase):
    """infer, get_inference_status, evaluate, read_annotation, convert_masks."""

    jobs: InferenceJobs

    @api_method
    async def infer(
        self,
        artifact: str | None = None,
        image_paths: list[str] | None = None,
        input_arrays: list[Any] | None = None,
        model: str = "cpsam",
        diameter: float | None = INF["diameter"],
        flow_threshold: float = INF["flow_threshold"],
        cellprob_threshold: float = INF["cellprob_threshold"],
        niter: int | None = INF["niter"],
        return_flows: bool = INF["return_flows"],
        return_flows_only: bool = False,
        json_safe: bool = False,
        enable_clahe: bool = INF["enable_clahe"],
        block_size: int | None = INF["block_size"],
        block_overlap: int = INF["block_overlap"],
        context: Any = None,
    ) -> list[dict[str, Any]]:
        """Segment images. Returns one dict per image: "input_path" and "output" (labels).

        artifact + image_paths: images in a dataset artifact you may read.
        input_arrays: numpy arrays (C,H,W) or (H,W) (or (H,W,3) RGB).
        model: "cpsam", a checkpoint name, one of your training session ids, or a
        model artifact exported by this service ("workspace/alias" or its URL).
        diameter: object diameter in pixels; None means no rescaling (cellpose 4 has no size model).
        return_flows: add "flows" = [HSV flow picture, dP (2,H,W), cell probability (H,W)].
        return_flows_only: "output" is {"dP", "cellprob"}; no masks, thresholds unused.
        json_safe: "output" is a PNG overlay {"encoding": "mask_png_base64", "width",
        "height", "object_count", "png_base64"} for browsers.
        enable_clahe: contrast-limited histogram equalisation first (grey image).
        block_size / block_overlap: segment 2D images block by block (None: automatically,
        above 16 megapixels). A 2D TIFF/Zarr artifact image that goes block-wise (above 16
        megapixels, or any with block_size) is too large to answer through the RPC: its item
        is {"input_path", "job_id", "status"} at once; poll get_inference_status(job_id) for
        the blocks done and, when completed, the labels file in a result artifact only you
        may read.
        """
        caller = caller_from_context(context)
        settings = InferenceSettings(
            diameter=diameter,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            niter=niter,
            enable_clahe=bool(enable_clahe),
            return_flows=bool(return_flows),
            compute_masks=not bool(return_flows_only),
            block_size=block_size,
            block_overlap=block_overlap,
        )
        with contextlib.ExitStack() as stack:  # the cached artifact version stays until done
            return await self._infer(
                stack, caller, settings, model, artifact, image_paths, input_arrays, json_safe
            )

    async def _infer(
        self,
        stack: contextlib.ExitStack,
        caller: Any,
        settings: InferenceSettings,
        model: str,
        artifact: str | None,
        image_paths: list[str] | None,
        input_arrays: list[Any] | None,
        json_safe: bool,
    ) -> list[dict[str, Any]]:
        """infer's work; ``stack`` holds the pin of the artifact version read."""
        if (input_arrays is None) == (image_paths is None):
            raise InvalidInput("input_arrays", "give either input_arrays or artifact + image_paths")
        if model is None or model == "":
            model = "cpsam"
        if caller.is_anonymous and (model != "cpsam" or input_arrays is None):
            raise Forbidden("anonymous callers may only run model 'cpsam' on input_arrays")
        ref = await self._resolve_model(model, caller)
        images: list[np.ndarray] = []
        names: list[str] = []
        jobs: dict[str, Path] = {}  # artifact images segmented block-wise from disk, as jobs
        pin = ""  # the cached version they read (one artifact per call)
        if input_arrays is not None:
            if not isinstance(input_arrays, list | tuple) or not input_arrays:
                raise InvalidInput("input_arrays", "must be a non-empty list of arrays")
            if len(input_arrays) > self.config.max_images_per_call:
                raise ResourceLimit(
                    f"input_arrays: at most {self.config.max_images_per_call} images per call"
                )
            for i, arr in enumerate(input_arrays):
                name = f"input_arrays[{i}]"
                if not isinstance(arr, np.ndarray):
                    raise InvalidInput(name, f"expected a numpy array, got {type(arr).__name__}")
                self._check_pixels(arr.shape, name)
                img = to_canonical(arr, "YX" if arr.ndim == 2 else None, name=name)
                if not np.all(np.isfinite(img)):
                    raise InvalidInput(name, "contains NaN or infinite values")
                images.append(img)
                names.append(name)
        else:
            if artifact is None:
                raise InvalidInput("artifact", "needed with image_paths")
            if not isinstance(image_paths, list | tuple) or not image_paths:
                raise InvalidInput("image_paths", "must be a non-empty list of paths")
            if len(image_paths) > self.config.max_images_per_call:
                raise ResourceLimit(
                    f"image_paths: at most {self.config.max_images_per_call} per call"
                )
            paths = [safe_relpath(p, f"image_paths[{i}]") for i, p in enumerate(image_paths)]
            record = await readable_artifact(self.artifacts, artifact, caller)
            assert self.artifacts is not None
            pin = self.artifacts.pin(record)  # each job pins again; released below
            stack.callback(self.artifacts.unpin, pin)
            local = await self.artifacts.download(record["id"], paths, record=record)
            for p in paths:
                shape = await asyncio.to_thread(blockwise_shape, local[p], settings, p)
                if shape is not None:
                    height, width = int(shape[-2]), int(shape[-1])
                    if height * width > self.config.max_blockwise_pixels:
                        raise ResourceLimit(
                            f"{p}: {height}x{width} pixels is more than the limit of "
                            f"{self.config.max_blockwise_pixels:,} for block-wise segmentation"
                        )
                    jobs[p] = local[p]
                    continue
                images.append(read_image(local[p], max_pixels=self.config.max_pixels))
                names.append(p)
        for img, name in zip(images, names, strict=True):
            check_input_size(img, settings.diameter, self.config.max_pixels, name=name)
        started = {
            p: self._start_job(ref, p, path, settings, caller, pin) for p, path in jobs.items()
        }
        results: list[Any] = []
        if images:
            async with self.infer_gate.slot(caller.id):  # round robin between users
                results = await self.inference.segment(ref, images, names, settings)
        answers = {
            name: self._result_item(name, result, settings, bool(json_safe))
            for name, result in zip(names, results, strict=True)
        }
        answers.update(
            {
                p: {"input_path": p, "job_id": job.id, "status": job.status}
                for p, job in started.items()
            }
        )
        order = names if input_arrays is not None else paths
        return [answers[name] for name in order]

    # ------------------------------------------------------------------ block-wise jobs
    def _start_job(
        self,
        ref: Any,
        name: str,
        path: Path,
        settings: InferenceSettings,
        caller: Any,
        pin: str,
    ) -> InferenceJob:
        """Start a job; it keeps the image's cached version pinned until it ends."""
        assert self.artifacts is not None
        job = self.jobs.new(caller.id, name)
        self.artifacts.bound.acquire(pin)
        job.task = asyncio.create_task(self._run_job(job, ref, path, settings))
        job.task.add_done_callback(lambda _t: self.artifacts and self.artifacts.unpin(pin))
        return job

    async def _run_job(
        self, job: InferenceJob, ref: Any, path: Path, settings: InferenceSettings
    ) -> None:
        """Segment in the executor's worker, compress, upload for the owner; errors named."""
        folder = self.jobs.folder(job)
        stem = output_stem(job.input_path)
        try:
            async with self.infer_gate.slot(job.owner):
                job.status = "running"
                summary = await self.inference.segment_file(
                    ref, str(path), str(folder / "labels.tif"), settings, progress=job.progress
                )
            job.n_objects = summary["n_objects"]
            job.blocks_done = job.blocks_total = 2 * summary["n_blocks"]  # two passes
            job.status = "uploading"
            file_name = f"{stem}_masks.tif"
            size = await asyncio.to_thread(
                compress_labels, folder / "labels.tif", folder / file_name
            )
            (folder / "labels.tif").unlink()
            job.result = {
                **{k: summary[k] for k in ("shape", "dtype", "block_size", "overlap", "truncated")},
                **await self._upload_labels(job, folder / file_name),
                "file": file_name,
                "file_bytes": size,
            }
            job.status = "completed"
        except asyncio.CancelledError:
            job.status, job.error = "failed", "the service stopped"
            raise
        except Exception as exc:  # named for the caller, the service keeps serving
            job.status = "failed"
            job.error = scrub_paths(str(public_error(exc)), self.config.data_dir)
        finally:
            job.finished = time.time()
            self.jobs.save(job)
            self.jobs.clean(job)

    async def _upload_labels(self, job: InferenceJob, path: Path) -> dict[str, Any]:
        """A result artifact in the service's workspace, readable by the job's owner only."""
        from cellpose_finetuning.data.artifacts import upload_files

        assert self.artifacts is not None
        am = self.artifacts.am
        art = await am.create(
            alias=f"{RESULT_PREFIX}{job.id}",
            type="generic",
            stage=True,
            manifest={
                "name": f"labels of {job.input_path}",
                "description": "Block-wise segmentation by cellpose-finetuning's infer",
                "owner": job.owner,
            },
            config={"permissions": {job.owner: "r"}},
        )
        await upload_files(am, art["id"], {path.name: path})
        url = await am.get_file(art["id"], file_path=path.name)
        return {"artifact_id": art["id"], "download_url": url}

    @api_method
    async def get_inference_status(self, job_id: str, context: Any = None) -> dict[str, Any]:
        """Progress of a block-wise infer job (infer's answer for a large artifact image).

        Returns job_id, status ("waiting", "running", "uploading", "completed", "failed"),
        input_path, blocks_done, blocks_total (block visits: each block is visited twice, for
        the network, then for the flow check and writing), n_objects (so far),
        elapsed_seconds; "error"
        when failed; when completed also "artifact_id" and "file" (the labels, a zlib-tiled
        uint32 BigTIFF <stem>_masks.tif, in an artifact only you may read: fetch it with
        artifact-manager get_file), "download_url" (presigned, made afresh at each poll; absent
        once the result expired), "file_bytes",
        "shape", "dtype", "block_size", "overlap" and "truncated". Only the caller who
        started the job may poll it; a restarted service still answers (a job it was
        running then reads "failed", interrupted by the restart).
        """
        caller = caller_from_context(context)
        out = self.jobs.get(job_id, caller.id).public()
        if out["status"] == "completed" and self.artifacts is not None:
            # a fresh URL each poll: the first one expires, and records on disk keep none
            out.pop("download_url", None)
            with contextlib.suppress(Exception):  # the result expired (deleted): no URL
                out["download_url"] = await self.artifacts.am.get_file(
                    out["artifact_id"], file_path=out["file"]
                )
        return out

    @staticmethod
    def _result_item(
        name: str, result: Any, settings: InferenceSettings, json_safe: bool
    ) -> dict[str, Any]:
        """One image's answer in the original's shape."""
        if not isinstance(result, Segmentation):
            result = Segmentation(masks=result)
        item: dict[str, Any] = {"input_path": name}
        if not settings.compute_masks:
            assert result.flows is not None
            dp, cellprob = result.flows[1], result.flows[2]
            item["output"] = {
                "dP": np.ascontiguousarray(dp, dtype="float32"),
                "cellprob": np.ascontiguousarray(cellprob, dtype="float32"),
            }
            return item
        assert result.masks is not None
        item["output"] = encode_mask_png(result.masks) if json_safe else result.masks
        if settings.return_flows and result.flows is not None:
            item["flows"] = [np.ascontiguousarray(f) for f in result.flows]
        return item

    def _check_pixels(self, shape: tuple[int, ...], name: str) -> None:
        if int(np.prod(shape, dtype="float64")) > self.config.max_pixels:
            raise ResourceLimit(
                f"{name}: {shape} has more than the limit of {self.config.max_pixels:,} values"
            )

    # ------------------------------------------------------------------ annotation files
    @api_method
    async def read_annotation(
        self,
        file_name: str,
        data: bytes,
        image_shape: list[int] | None = None,
        context: Any = None,
    ) -> dict[str, Any]:
        """Read one annotation file as training reads it, before anything is uploaded.

        file_name: its name; the suffix picks the reader (label image, cellpose GUI _seg.npy,
        QuPath .geojson, ImageJ ROI set .zip). data: the file's bytes. image_shape: the paired
        image's [height, width] (needed for .geojson and .zip). Returns {"labels": uint16 or
        uint32 array, "n_objects": int}; errors name the file.
        """
        from cellpose_finetuning.io.annotations import read_annotation_bytes

        caller_from_context(context)
        if isinstance(data, bytes | bytearray) and len(data) > self.config.max_pixels * 8:
            raise ResourceLimit(f"{file_name}: file larger than {self.config.max_pixels * 8:,} B")
        labels = await asyncio.to_thread(
            read_annotation_bytes,
            file_name,
            data,
            image_shape,
            max_pixels=self.config.max_pixels,
        )
        return {"labels": labels, "n_objects": int(labels.max())}

    @api_method
    async def convert_masks(
        self,
        masks: Any,
        image_name: str,
        formats: list[str] | None = None,
        context: Any = None,
    ) -> dict[str, bytes]:
        """Masks as the files the tools open: {file name: bytes}.

        masks: (H, W) labels (e.g. infer's "output"). image_name: the segmented image's file
        name; names keep its whole stem. formats: any of "tif" (<stem>_masks.tif), "seg"
        (cellpose GUI <stem>_seg.npy), "png" (<stem>_cp_masks.png), "rois" (Fiji
        <stem>_rois.zip), "geojson" (QuPath <stem>.geojson); default all.
        """
        from cellpose_finetuning.io.annotations import OUTPUT_FORMATS, encode_outputs

        caller_from_context(context)
        if not isinstance(masks, np.ndarray):
            raise InvalidInput("masks", f"expected a numpy array, got {type(masks).__name__}")
        self._check_pixels(masks.shape, "masks")
        if not isinstance(image_name, str) or not image_name.strip():
            raise InvalidInput("image_name", "must be the image's file name")
        return await asyncio.to_thread(
            encode_outputs, masks, image_name, list(formats or OUTPUT_FORMATS)
        )

    # ------------------------------------------------------------------ evaluation
    @api_method
    async def evaluate(
        self,
        models: list[str],
        artifact: str,
        test_images: str,
        test_annotations: str,
        diameter: float | None = INF["diameter"],
        flow_threshold: float = INF["flow_threshold"],
        cellprob_threshold: float = INF["cellprob_threshold"],
        pictures: bool = True,
        block_size: int | None = INF["block_size"],
        block_overlap: int = INF["block_overlap"],
        context: Any = None,
    ) -> dict[str, Any]:
        """Score models on a labelled dataset: did fine-tuning help?

        models: names as for infer ("cpsam", a checkpoint name, your session ids), up to 8.
        artifact + test_images/test_annotations: a dataset you may read, paired as in
        start_training. Every model segments every image with the same settings.
        Returns "report" (per model: AP at IoU 0.5/0.75/0.9, precision/recall/F1 at 0.5,
        n_true, n_pred, and the same per image), "markdown" (the tables) and, with
        pictures, "per_image_ap_png" (bar chart) and "overlays_png" (image, ground truth,
        each model) as PNG bytes. block_size / block_overlap: as for infer (block-wise
        segmentation of each image, None: automatic).
        """
        from cellpose_finetuning.engine.evaluation import (
            load_labelled,
            report_pictures,
            score_predictions,
        )

        caller = caller_from_context(context)
        caller.require_login("evaluate")
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list | tuple) or not models:
            raise InvalidInput("models", "must be a non-empty list of model names")
        if len(models) > 8:
            raise ResourceLimit("models: at most 8 models per call")
        settings = InferenceSettings(
            diameter=diameter,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            block_size=block_size,
            block_overlap=block_overlap,
        )
        refs = [await self._resolve_model(m, caller) for m in models]
        for arg, spec in (("test_images", test_images), ("test_annotations", test_annotations)):
            if not isinstance(spec, str):
                raise InvalidInput(arg, "must be a string")
        check_specs(
            test_images,
            test_annotations,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )
        artifact_id = await self._readable_artifact(artifact, caller)
        assert self.artifacts is not None
        names = await self.artifacts.list_specs(artifact_id, [test_images, test_annotations])
        pairs = pair_files(
            test_images,
            test_annotations,
            names,
            images_arg="test_images",
            annotations_arg="test_annotations",
        )
        if len(pairs) > self.config.max_images_per_call:
            raise ResourceLimit(
                f"test_images: {len(pairs)} pairs; at most {self.config.max_images_per_call} "
                "per evaluation"
            )
        async with self.artifacts.fetched(
            artifact_id, [p for pair in pairs for p in (pair.image, pair.annotation)]
        ) as local:
            for pair in pairs:
                read_image(local[pair.image], max_pixels=self.config.max_pixels)  # size check
            data = await asyncio.to_thread(
                load_labelled,
                [(local[p.image], local[p.annotation]) for p in pairs],
                [p.image for p in pairs],
            )
        images = [img for _, img, _ in data]
        predictions, seconds = {}, {}
        for name, ref in zip(models, refs, strict=True):
            t0 = asyncio.get_running_loop().time()
            predictions[name] = await self.inference.segment(
                ref, images, [n for n, _, _ in data], settings
            )
            seconds[name] = asyncio.get_running_loop().time() - t0
        report = await asyncio.to_thread(score_predictions, predictions, data, settings, seconds)
        out: dict[str, Any] = {
            "report": report.model_dump(mode="json"),
            "markdown": report.to_markdown(),
        }
        if pictures:
            pngs = await asyncio.to_thread(report_pictures, report, data, predictions)
            out["per_image_ap_png"] = pngs["bars"]
            out["overlays_png"] = pngs["overlays"]
        return out
