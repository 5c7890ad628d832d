"""Pydantic models for everything that crosses a boundary: settings, status, metrics.

Field names and status types follow the contract of the original hosted
service (``get_training_status``), so existing clients read our status as
they read theirs. Extra fields (``session_id``, ``model``, ``settings``,
``best_epoch``...) are additions, never renames.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_VALIDATION_INTERVAL",
    "INFERENCE_DEFAULTS",
    "TERMINAL_STATES",
    "TRAINING_DEFAULTS",
    "InferenceSettings",
    "InstanceMetrics",
    "StatusType",
    "TrainingSettings",
    "TrainingStatus",
    "ValidationMetrics",
    "field_defaults",
    "public_status",
]

#: Fields of ``status.json`` that are ours alone (which process runs the session).
INTERNAL_STATUS_FIELDS = frozenset({"worker_pid", "worker_create_time", "worker_host"})
#: The run's parameters the original service shows at the top level of a status.
RUN_PARAMETERS = (
    "n_epochs",
    "n_samples",
    "learning_rate",
    "weight_decay",
    "min_train_masks",
    "validation_interval",
)

StatusType = Literal["waiting", "preparing", "running", "completed", "failed", "stopped"]
#: States in which no worker is (or will be) busy with the session.
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "stopped"})
#: Contract: ``validation_interval=None`` validates every 10 epochs.
DEFAULT_VALIDATION_INTERVAL = 10


class ValidationMetrics(BaseModel):
    """Pixel-level foreground metrics on the test set for one epoch.

    Predicted foreground is cell probability logit > 0; true foreground is
    any labelled pixel.
    """

    pixel_accuracy: float
    precision: float
    recall: float
    f1: float
    iou: float


class InstanceMetrics(BaseModel):
    """Instance segmentation metrics from full cellpose inference on the test set."""

    ap_0_5: float
    ap_0_75: float
    ap_0_9: float
    n_true: int
    n_pred: int
    precision_0_5: float | None = Field(
        None, description="Matched objects (IoU >= 0.5) / predicted objects, over the set."
    )
    recall_0_5: float | None = Field(
        None, description="Matched objects (IoU >= 0.5) / true objects, over the set."
    )
    f1_0_5: float | None = Field(None, description="F1 of objects matched at IoU >= 0.5.")


class TrainingSettings(BaseModel):
    """Everything that defines a training run, validated once at the edge.

    Defaults are the contract's (10 epochs, lr 1e-6, weight decay 1e-4).
    cellpose's own recommendation for fine-tuning ``cpsam`` is lr 1e-5,
    weight decay 0.1 and about 100 epochs.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field("cpsam", description="Base model: 'cpsam' or a checkpoint path.")
    n_epochs: int = Field(10, ge=1, le=10_000, description="Number of training epochs.")
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=10.0, description="AdamW weight decay.")
    validation_interval: int | None = Field(
        None,
        ge=1,
        description="Epochs between validations; always validates the first and last "
        "epoch. None: every 10 epochs. Needs test data.",
    )
    n_samples: int | float | None = Field(
        None,
        gt=0,
        description="Use a random subset of the training pairs: a whole number >= 1 is a "
        "count, a value between 0 and 1 a fraction of the pairs (0.05 = 5%). None: all.",
    )
    batch_size: int = Field(1, ge=1, le=256, description="Tiles per optimisation step.")
    min_train_masks: int = Field(
        5,
        ge=0,
        description="Training images with fewer objects are dropped (cellpose's rule and "
        "default, and the original service's).",
    )
    enable_clahe: bool = Field(
        False,
        description="Contrast-limited adaptive histogram equalisation of training and test "
        "images (grey, clip limit 3, 16x16 tiles), as the original service applies it; for "
        "brightfield or phase contrast with a narrow intensity range.",
    )
    rescale: bool = Field(
        False,
        description="Resize training tiles so that objects match the network's diameter "
        "(cellpose's train_seg rescale). Off by default, as in the Cellpose-SAM paper.",
    )
    lr_schedule: Literal["proportional", "cellpose"] = Field(
        "proportional",
        description="'proportional': linear warm-up over warmup_epochs starting above 0, so "
        "short runs reach their learning rate; 'cellpose': cellpose's fixed 10-epoch warm-up "
        "from 0 (a 10-epoch run never trains at full rate). Both halve the rate at the end of "
        "runs over 99 epochs as cellpose does.",
    )
    warmup_epochs: int | None = Field(
        None,
        ge=0,
        description="Linear learning-rate warm-up length. None: 10% of the run, at most "
        "10 epochs (cellpose always uses 10 epochs starting from 0).",
    )
    seed: int = Field(0, description="Seed for sample selection and augmentation.")
    device: str | None = Field(None, description="Torch device; automatic by default.")
    checkpoint_interval_s: float = Field(
        60.0, ge=0, description="Save the last checkpoint at most this often mid-run."
    )
    nimg_per_epoch: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Training tiles per epoch (cellpose's nimg_per_epoch). None: one per "
        "training image. With 5 images and nimg_per_epoch=40 an epoch has 40 samples.",
    )
    sampling: Literal["permutation", "cellpose"] = Field(
        "permutation",
        description="How an epoch picks its images: 'permutation' takes every image once per "
        "pass in a random order (passes repeated to fill nimg_per_epoch); 'cellpose' is "
        "train_seg's: a permutation when nimg_per_epoch equals the number of images, else "
        "drawn with replacement.",
    )
    recipe: Literal["contract", "cellpose", "from-scratch"] | None = Field(
        None,
        description="Named settings (see README): 'contract' (the original service's "
        "defaults), 'cellpose' (cellpose's fine-tuning settings for cpsam), 'from-scratch' "
        "(what the untrained tiny/small networks need). Values given explicitly win.",
    )

    @field_validator("n_samples")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None) -> int | float | None:
        if value is None or isinstance(value, int) or 0 < value < 1:
            return value
        if float(value).is_integer():
            return int(value)
        raise ValueError("must be a whole number (a count) or between 0 and 1 (a fraction)")

    @property
    def effective_validation_interval(self) -> int:
        """The validation interval with the contract's default applied."""
        return self.validation_interval or DEFAULT_VALIDATION_INTERVAL


class TrainingStatus(BaseModel):
    """What ``get_training_status`` returns; persisted as ``status.json``."""

    model_config = ConfigDict(extra="ignore")

    session_id: str
    status_type: StatusType = "waiting"
    message: str = ""
    dataset_artifact_id: str | None = None
    model: str = "cpsam"
    train_losses: list[float] = Field(default_factory=list)
    test_losses: list[float | None] = Field(default_factory=list)
    test_metrics: list[ValidationMetrics | None] = Field(default_factory=list)
    instance_metrics: InstanceMetrics | None = None
    n_train: int | None = None
    n_test: int | None = None
    start_time: str | None = None
    current_epoch: int | None = None
    total_epochs: int | None = None
    elapsed_seconds: float | None = None
    best_epoch: int | None = None
    current_batch: int | None = None
    total_batches: int | None = None
    last_continued_time: str | None = None
    exported_artifact_id: str | None = None
    model_modified: bool | None = None
    label: str | None = None
    settings: dict = Field(default_factory=dict)
    updated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    worker_pid: int | None = None
    worker_create_time: float | None = None
    worker_host: str | None = None
    base_instance_metrics: InstanceMetrics | None = Field(
        None,
        description="The same metrics as instance_metrics for the starting weights, scored "
        "on the test set before the first epoch.",
    )


class InferenceSettings(BaseModel):
    """Parameters of one inference call (cellpose ``eval`` arguments we expose)."""

    model_config = ConfigDict(extra="forbid")

    diameter: float | None = Field(
        None,
        gt=0,
        le=10_000,
        description="Typical object diameter in pixels. The image is resized by 30/diameter. "
        "None: no resizing (cellpose 4 has no size model; nothing is estimated).",
    )
    flow_threshold: float = Field(0.4, ge=0, description="Flow error threshold (2D only).")
    cellprob_threshold: float = Field(0.0, ge=-10, le=10, description="Cell probability cut.")
    niter: int | None = Field(
        None, ge=0, le=10_000, description="Dynamics iterations; None/0 = 200 scaled by diameter."
    )
    batch_size: int = Field(8, ge=1, le=256, description="Tiles per network pass.")
    min_size: int = Field(15, ge=-1, description="Drop objects smaller than this (pixels).")
    tile_overlap: float = Field(0.1, ge=0.0, le=0.5, description="Fraction of tile overlap.")
    do_3D: bool = Field(  # noqa: N815 - cellpose's own name
        False, description="Run true 3D segmentation on (Z,C,H,W) stacks."
    )
    stitch_threshold: float = Field(
        0.0, ge=0.0, le=1.0, description="Segment planes in 2D and stitch by this IoU."
    )
    anisotropy: float | None = Field(None, gt=0, description="Z sampling ratio for do_3D.")
    enable_clahe: bool = Field(
        False,
        description="Contrast-limited adaptive histogram equalisation of the image first (grey, "
        "clip limit 3, 16x16 tiles), as for training with enable_clahe.",
    )
    return_flows: bool = Field(
        False,
        description="Also return cellpose's flows: [HSV flow picture, dP (2,H,W), cell "
        "probability (H,W), final pixel positions].",
    )
    compute_masks: bool = Field(
        True,
        description="False: only run the network and return dP and cell probability "
        "(the original's return_flows_only); thresholds are then not used.",
    )
    block_size: int | None = Field(
        None,
        ge=64,
        le=16_384,
        description="Segment a 2D image block by block (whole-slide images, memory bounded by "
        "the block): the side of a block in pixels. None: automatic, block-wise only for images "
        "above 16 megapixels or too large for the available memory, with the block chosen from "
        "it. Not with diameter, CLAHE, flows or 3D (those run in one pass).",
    )
    block_overlap: int = Field(
        64,
        ge=0,
        le=1024,
        description="Pixels added around each block; objects cut by a block border are kept "
        "whole by the block holding their centre, so this must exceed the objects' size.",
    )

    @model_validator(mode="after")
    def _check_3d(self) -> InferenceSettings:
        if self.do_3D and self.stitch_threshold > 0:
            raise ValueError("use either do_3D or stitch_threshold > 0, not both")
        return self


def public_status(status: TrainingStatus, *, owner: str | None = None) -> dict[str, Any]:
    """The status as callers get it: the original service's keys and shapes.

    A key whose value is not known yet is left out, never ``None`` (the
    contract's own polling loops format ``status["elapsed_seconds"]`` once the
    key is present). The loss and metric lists keep their ``None`` entries
    for epochs without validation, as the contract shows them. The run's
    parameters are repeated at the top level, ``current_loss`` is the last
    training loss and ``user_id`` the owner; which process runs the session
    is not shown.

    Parameters
    ----------
    status : TrainingStatus
        As stored in ``status.json``.
    owner : str, optional
        The session's owner, shown as ``user_id``.

    Returns
    -------
    dict
        JSON-safe status with ``session_id``.
    """
    out = status.model_dump(mode="json", exclude=set(INTERNAL_STATUS_FIELDS))
    for name in RUN_PARAMETERS:
        out.setdefault(name, status.settings.get(name))
    if status.train_losses:
        out["current_loss"] = status.train_losses[-1]
    if owner is not None:
        out["user_id"] = owner
    if out.get("current_epoch") is not None and out.get("elapsed_seconds") is None:
        # The contract's examples print elapsed_seconds whenever current_epoch is there.
        out["elapsed_seconds"] = 0.0
    return {k: v for k, v in out.items() if v is not None}


def field_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Each field's default, by name: what every edge (CLI, service, web) offers.

    Service signatures and CLI options take their defaults from here, and a test
    checks them all against the models, so a default is written once.
    """
    return {name: field.default for name, field in model.model_fields.items()}


#: Defaults of :class:`TrainingSettings` and :class:`InferenceSettings`.
TRAINING_DEFAULTS = field_defaults(TrainingSettings)
INFERENCE_DEFAULTS = field_defaults(InferenceSettings)
