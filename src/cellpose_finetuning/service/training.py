"""The service's training methods: datasets in, sessions out (start, preflight)."""

from __future__ import annotations

import asyncio
import posixpath
from pathlib import Path
from typing import Any

from cellpose_finetuning.data.cache import link_tree
from cellpose_finetuning.data.metadata import load_metadata_document, pairs_from_metadata
from cellpose_finetuning.data.pairing import (
    Pair,
    check_specs,
    pair_files,
    resolve_n_samples,
    safe_relpath,
    spec_dir,
)
from cellpose_finetuning.engine.recipes import (
    apply_recipe,
)
from cellpose_finetuning.engine.runs import (
    training_data,
    validate_settings,
)
from cellpose_finetuning.engine.schemas import (
    TERMINAL_STATES,
    TrainingSettings,
)
from cellpose_finetuning.engine.schemas import TRAINING_DEFAULTS as TRAIN
from cellpose_finetuning.engine.sessions import (
    DataSpec,
    Session,
)
from cellpose_finetuning.errors import (
    CellposeFinetuningError,
    InvalidInput,
    NotFound,
    ResourceLimit,
)
from cellpose_finetuning.io.images import read_image
from cellpose_finetuning.service.auth import (
    caller_from_context,
    readable_artifact,
)
from cellpose_finetuning.service.base import ServiceBase
from cellpose_finetuning.service.edge import (
    DATASET_DIR,
    api_method,
    public_error,
    status_dict,
    with_warnings,
)

__all__ = ["TrainingMethods"]


class TrainingMethods(ServiceBase):
    """start_training and preflight_training_dataset, with the dataset pairing they share."""

    # ------------------------------------------------------------------ training
    def _check_data_args(
        self,
        train_images: Any,
        train_annotations: Any,
        metadata_dir: Any,
        test_images: Any,
        test_annotations: Any,
    ) -> dict[str, str]:
        """Check the pairing arguments; returns the specs given (metadata_dir included)."""
        if (test_images is None) != (test_annotations is None):
            missing = "test_annotations" if test_annotations is None else "test_images"
            raise InvalidInput(missing, "test_images and test_annotations must be given together")
        if metadata_dir is None and (train_images is None or train_annotations is None):
            missing = "train_images" if train_images is None else "train_annotations"
            raise InvalidInput(missing, "give train_images and train_annotations, or metadata_dir")
        if (train_images is None) != (train_annotations is None):
            missing = "train_annotations" if train_annotations is None else "train_images"
            raise InvalidInput(missing, "train_images and train_annotations go together")
        specs: dict[str, str] = {}
        for arg, spec in (
            ("train_images", train_images),
            ("train_annotations", train_annotations),
            ("test_images", test_images),
            ("test_annotations", test_annotations),
            ("metadata_dir", metadata_dir),
        ):
            if spec is None:
                continue
            if not isinstance(spec, str) or not spec.strip():
                raise InvalidInput(arg, "must be a non-empty string")
            specs[arg] = spec
        if "metadata_dir" in specs:
            specs["metadata_dir"] = safe_relpath(
                specs["metadata_dir"].rstrip("/") + "/", "metadata_dir"
            )
        if "train_images" in specs:
            check_specs(specs["train_images"], specs["train_annotations"])
        if "test_images" in specs:
            check_specs(
                specs["test_images"],
                specs["test_annotations"],
                images_arg="test_images",
                annotations_arg="test_annotations",
            )
        return specs

    async def _resolve_pairs(
        self, artifact_id: str, specs: dict[str, str]
    ) -> tuple[list[Pair], list[Pair], int]:
        """List the dataset and pair its files: (train, test, files listed)."""
        assert self.artifacts is not None
        pattern_specs = [v for k, v in specs.items() if k != "metadata_dir"]
        names = await self.artifacts.list_specs(artifact_id, pattern_specs) if pattern_specs else []
        train: list[Pair] = []
        test: list[Pair] = []
        if "metadata_dir" in specs:
            train, test, listed = await self._metadata_pairs(artifact_id, specs["metadata_dir"])
            names = list(dict.fromkeys([*names, *listed]))
        if len(names) > self.config.max_files:
            raise ResourceLimit(
                f"the dataset lists {len(names)} files (limit {self.config.max_files})"
            )
        if not train and "train_images" in specs:
            train = pair_files(specs["train_images"], specs["train_annotations"], names)
        if not train:
            raise InvalidInput(
                "metadata_dir", "no image/annotation records in its JSON files (see docs/api.md)"
            )
        if "test_images" in specs:
            test = pair_files(
                specs["test_images"],
                specs["test_annotations"],
                names,
                images_arg="test_images",
                annotations_arg="test_annotations",
            )
        return train, test, len(names)

    async def _metadata_pairs(
        self, artifact_id: str, metadata_dir: str
    ) -> tuple[list[Pair], list[Pair], list[str]]:
        """Pairs from the JSON files below ``metadata_dir`` (the original's format)."""
        assert self.artifacts is not None
        folder = spec_dir(metadata_dir)
        try:
            below = await self.artifacts.list_tree(
                artifact_id, folder, max_files=self.config.max_files
            )
        except NotFound:
            below = []
        json_files = [n for n in below if n.lower().endswith(".json")]
        if not json_files:
            raise InvalidInput(
                "metadata_dir", f"no JSON files in {metadata_dir!r} of {artifact_id!r}"
            )
        documents = {}
        async with self.artifacts.fetched(artifact_id, json_files) as local:
            for name in json_files:
                if local[name].stat().st_size > 16 * 1024 * 1024:
                    raise ResourceLimit(f"metadata_dir: {name} is larger than 16 MiB")
                documents[name] = load_metadata_document(local[name].read_bytes(), name)
        train, test = pairs_from_metadata(documents)
        folders = {
            posixpath.dirname(p) for pair in (*train, *test) for p in (pair.image, pair.annotation)
        }
        listed = await self.artifacts.list_specs(artifact_id, sorted(folders)) if folders else []
        pairs_from_metadata(documents, listed)  # every listed file must exist
        return train, test, listed

    @api_method
    async def start_training(
        self,
        artifact: str,
        train_images: str | None = None,
        train_annotations: str | None = None,
        metadata_dir: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        model: str = TRAIN["model"],
        n_samples: int | float | None = TRAIN["n_samples"],
        n_epochs: int = TRAIN["n_epochs"],
        learning_rate: float = TRAIN["learning_rate"],
        weight_decay: float = TRAIN["weight_decay"],
        min_train_masks: int = TRAIN["min_train_masks"],
        validation_interval: int | None = TRAIN["validation_interval"],
        enable_clahe: bool = TRAIN["enable_clahe"],
        rescale: bool = TRAIN["rescale"],
        label: str | None = None,
        context: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Start fine-tuning on a dataset artifact. Returns the status with "session_id".

        train_images/train_annotations: two folders ending in "/" (same file names) or two
        patterns with one "*" whose matched parts must be equal ("images/*.tif",
        "annotations/*_mask.tif"). Or metadata_dir: a folder of JSON files listing the
        image/annotation pairs. test_images/test_annotations: the same, for validation.
        model: "cpsam", a checkpoint name, one of your sessions, or a model artifact
        exported by this service. n_samples: a count, or a fraction between 0 and 1.
        label: free text to find the session by (list_training_sessions(labels=...)).
        Extra settings (see get_training_capabilities()): batch_size, lr_schedule,
        warmup_epochs, seed, nimg_per_epoch, sampling, recipe ("contract", "cellpose",
        "from-scratch": named settings; values you give win, the contract's defaults do not).
        "warnings" lists reasons the run may not change the model.
        """
        caller = caller_from_context(context)
        caller.require_login("start_training")
        specs = self._check_data_args(
            train_images, train_annotations, metadata_dir, test_images, test_annotations
        )
        hidden = {"device", "checkpoint_interval_s"}
        allowed_extra = (set(TrainingSettings.model_fields) - hidden) | {"recipe"}
        unknown = set(extra) - allowed_extra
        if unknown:
            raise InvalidInput(sorted(unknown)[0], "unknown argument")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise InvalidInput("label", "must be a string of at most 200 characters")
        label = label.strip() or None if isinstance(label, str) else None
        if isinstance(n_epochs, int) and n_epochs > self.config.max_epochs:
            raise ResourceLimit(f"n_epochs: at most {self.config.max_epochs} on this service")
        if model is None or model == "":
            model = "cpsam"
        settings = validate_settings(
            apply_recipe(
                dict(
                    model=model,
                    n_epochs=n_epochs,
                    n_samples=n_samples,
                    learning_rate=learning_rate,
                    weight_decay=weight_decay,
                    min_train_masks=min_train_masks,
                    validation_interval=validation_interval,
                    enable_clahe=enable_clahe,
                    rescale=rescale,
                    **extra,
                )
            ),
            # metadata_dir may list test records; that is known only once it is read.
            has_test_data=test_images is not None or "metadata_dir" in specs,
        )
        base = await self._resolve_model(settings.model, caller)
        settings = settings.model_copy(update={"model": base.source})
        kept = self.sessions.list(owner=caller.id)
        if len(kept) >= self.config.max_sessions_per_user:
            raise ResourceLimit(
                f"you keep {len(kept)} training sessions (limit "
                f"{self.config.max_sessions_per_user}); delete some with delete_training_session"
            )
        active = [s for s in kept if s.read_status().status_type not in TERMINAL_STATES]
        if len(active) >= self.config.max_active_sessions_per_user:
            raise ResourceLimit(
                f"you already have {len(active)} active training sessions "
                f"(limit {self.config.max_active_sessions_per_user}); stop one first"
            )
        record = await readable_artifact(self.artifacts, artifact, caller)
        artifact_id = record["id"]
        session = self.sessions.create(
            settings,
            DataSpec(train=[], dataset_artifact_id=artifact_id, source=specs),
            owner=caller.id,
            message="Preparing: listing the dataset",
            label=label,
        )
        session.update_status(status_type="preparing", model=model)
        task = asyncio.get_running_loop().create_task(
            self._prepare(session, artifact_id, specs, record)
        )
        self._prepare_tasks[session.id] = task
        task.add_done_callback(lambda _t: self._prepare_tasks.pop(session.id, None))
        return with_warnings(status_dict(session), settings, base.source)

    async def _prepare(
        self,
        session: Session,
        artifact_id: str,
        specs: dict[str, str],
        record: dict[str, Any] | None = None,
    ) -> None:
        """List, pair and download the data, then queue the session."""
        assert self.artifacts is not None
        try:
            train, test, n_listed = await self._resolve_pairs(artifact_id, specs)
            data = training_data(
                train,
                test,
                session.settings,
                source={**specs, "max_pixels": self.config.max_pixels},
                dataset_artifact_id=artifact_id,
            )
            # n_available (engine): training pairs to sample from; this: files listed.
            data.source["n_files_listed"] = n_listed
            n_train, n_test = len(data.train), len(data.test)

            def progress(done: int, total: int) -> None:
                if done == total or done % 50 == 0:
                    session.update_status(
                        message=f"Preparing: downloaded {done}/{total} files "
                        f"({n_train} training pairs, {n_test} test pairs)"
                    )

            async with self.artifacts.fetched(
                artifact_id, data.files(), record=record, progress=progress
            ) as cached:
                # The session's own links: training and export never read the cache,
                # which may evict this version once preparation is over.
                own = await asyncio.to_thread(link_tree, cached, session.path / DATASET_DIR)
            session.write_data(data.renamed(own))
            self.queue.submit(session)
        except asyncio.CancelledError:
            # Only stop_training and shutdown cancel this task.
            session.update_status(status_type="stopped", message="Stopped before training started")
            raise
        except Exception as exc:
            message = (
                str(public_error(exc)) if not isinstance(exc, CellposeFinetuningError) else str(exc)
            )
            session.update_status(
                status_type="failed", message=f"Preparing the data failed: {message}"
            )

    @api_method
    async def preflight_training_dataset(
        self,
        artifact: str,
        train_images: str | None = None,
        train_annotations: str | None = None,
        metadata_dir: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        n_samples: int | float | None = None,
        check_masks: bool = False,
        context: Any = None,
    ) -> dict[str, Any]:
        """Check a dataset's pairing before training, without training.

        Returns ok, train_pair_count, test_pair_count, n_samples_resolved and message (the
        original's keys). With check_masks=True every pair is also downloaded and read as
        training would read it; "problems" then lists each file that is wrong.
        """
        caller = caller_from_context(context)
        caller.require_login("preflight_training_dataset")
        specs = self._check_data_args(
            train_images, train_annotations, metadata_dir, test_images, test_annotations
        )
        if n_samples is not None:
            resolve_n_samples(n_samples, 1)  # a clear error for 1.5, 0, "x"
        artifact_id = await self._readable_artifact(artifact, caller)
        try:
            train, test, _listed = await self._resolve_pairs(artifact_id, specs)
        except (InvalidInput, ResourceLimit) as exc:
            return {
                "ok": False,
                "train_pair_count": 0,
                "test_pair_count": 0,
                "message": str(exc),
            }
        resolved = resolve_n_samples(n_samples, len(train)) if n_samples is not None else None
        message = f"Resolved {len(train)} training pair(s)"
        if resolved is not None and resolved < len(train):
            message += f"; {resolved} will be used (n_samples={n_samples})"
        if test:
            message += f"; {len(test)} test pair(s)"
        out: dict[str, Any] = {
            "ok": True,
            "train_pair_count": len(train),
            "test_pair_count": len(test),
            "message": message + ".",
        }
        if resolved is not None:
            out["n_samples_resolved"] = min(resolved, len(train))
        if check_masks:
            problems = await self._check_pairs(artifact_id, [*train, *test])
            out["problems"] = problems
            if problems:
                out["ok"] = False
                out["message"] += f" {len(problems)} file(s) cannot be used: see problems."
        return out

    async def _check_pairs(self, artifact_id: str, pairs: list[Pair]) -> list[str]:
        """Read every pair as training would; one line per file that fails."""
        assert self.artifacts is not None
        wanted = [p for pair in pairs for p in (pair.image, pair.annotation)]
        async with self.artifacts.fetched(artifact_id, wanted) as local:
            return await asyncio.to_thread(self._check_local_pairs, pairs, local)

    def _check_local_pairs(self, pairs: list[Pair], local: dict[str, Any]) -> list[str]:
        """One line per downloaded file that training could not read."""
        from cellpose_finetuning.io.images import read_mask

        problems = []
        for pair in pairs:
            try:
                img = read_image(local[pair.image], max_pixels=self.config.max_pixels)
                read_mask(local[pair.annotation], expected_shape=tuple(img.shape[-2:]))
            except CellposeFinetuningError as exc:
                problems.append(
                    str(exc)
                    .replace(str(local[pair.image]), pair.image)
                    .replace(str(local[pair.annotation]), pair.annotation)
                )
        return problems


def adopt_cached_files(session: Any, cache_dir: Path) -> int:
    """Link a session's files that still point into the cache into the session itself.

    Sessions prepared before the cache was bounded (``ServiceConfig.cache_max_bytes``)
    read their dataset from ``<cache>/<uid>/<version>/<path>``; eviction would take
    those files from under a continue or an export. Each such file still there is
    hard-linked to ``<session>/dataset/<path>`` and ``data.json`` rewritten.

    Returns
    -------
    int
        Files adopted (0 when the session holds its own already).
    """
    if not (session.path / "data.json").is_file():
        return 0
    data = session.data
    cache = cache_dir.resolve()
    rel: dict[str, str] = {}
    for name in data.files():
        try:
            parts = Path(name).resolve().relative_to(cache).parts
        except ValueError:
            continue  # the session's own link, or a local file (CLI sessions)
        if len(parts) > 2 and Path(name).is_file():
            rel[name] = "/".join(parts[2:])  # the dataset path below <uid>/<version>/
    if not rel:
        return 0
    links = link_tree({rel[n]: Path(n) for n in rel}, session.path / DATASET_DIR)
    session.write_data(
        data.renamed({n: links[rel[n]] if n in rel else n for n in data.files()}),
        update_status=False,
    )
    return len(rel)
