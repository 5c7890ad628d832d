"""Pydantic models for everything that crosses a boundary: settings, status, metrics.

Field names and status types follow the contract of the original hosted
service (``get_training_status``), so existing clients read our status as
they read theirs. Extra fields (``session_id``, ``model``, ``settings``,
``best_epoch``...) are additions, never renames.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_VALIDATION_INTERVAL",
    "TERMINAL_STATES",
    "InferenceSettings",
    "InstanceMetrics",
    "StatusType",
    "TrainingSettings",
    "TrainingStatus",
    "ValidationMetrics",
]

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
    n_samples: int | None = Field(
        None, ge=1, description="Use a random subset of this many training pairs."
    )
    batch_size: int = Field(1, ge=1, le=256, description="Tiles per optimisation step.")
    min_train_masks: int = Field(
        1,
        ge=0,
        description="Training images with fewer objects are dropped (cellpose's rule; "
        "cellpose's own default is 5).",
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

    @model_validator(mode="after")
    def _check_3d(self) -> InferenceSettings:
        if self.do_3D and self.stitch_threshold > 0:
            raise ValueError("use either do_3D or stitch_threshold > 0, not both")
        return self
