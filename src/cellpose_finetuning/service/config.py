"""Where the service keeps its state, and its limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

__all__ = ["ServiceConfig"]


class ServiceConfig(BaseModel):
    """Where the service keeps its state, and its limits."""

    data_dir: Path
    max_concurrent_trainings: int = Field(1, ge=1, description="Trainings that run at once.")
    max_active_sessions_per_user: int = Field(
        3, ge=1, description="Sessions a user may have waiting, preparing or running."
    )
    max_epochs: int = Field(1000, ge=1, description="Most epochs a training may ask for.")
    max_pixels: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest image accepted, in values (all axes)."
    )
    max_blockwise_pixels: int = Field(
        1 << 31,
        ge=1,
        description="Largest 2D image (Y x X pixels) segmented block-wise as an infer job "
        "(whole slides; the default is about 46,000²).",
    )
    max_files: int = Field(50_000, ge=1, description="Most files a dataset listing may have.")
    max_images_per_call: int = Field(64, ge=1)
    worker_threads: int | None = Field(None, description="Torch threads per training worker.")
    inference_concurrency: int = Field(1, ge=1)
    device: str | None = None
    max_sessions_per_user: int = Field(
        100, ge=1, description="Sessions a user may keep (any state); delete old ones for more."
    )
    max_waiting_infers_per_user: int = Field(
        32,
        ge=1,
        description="infer calls of one user that may wait for a slot (a client sending 20 "
        "images as 20 calls at once is normal; the order stays fair whatever the cap).",
    )
    training_time_slice_s: float | None = Field(
        60.0,
        ge=0,
        description="Seconds a training keeps its slot before it pauses (after its epoch) "
        "for another user's waiting session; None: never.",
    )
    cache_max_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="Bound of the dataset download cache in bytes: after each download the "
        "least recently used dataset versions not in use are removed until it fits; 0: "
        "unbounded.",
    )
    job_result_ttl_hours: float = Field(
        168.0,
        ge=0,
        description="Hours a block-wise infer job's result artifact (its labels) is kept; "
        "older ones this service created are deleted at start and hourly; 0: kept forever.",
    )
    direct_s3_reads: bool = Field(
        True,
        description="Where the service is given the store's S3 keys (the embedded stack), read "
        "dataset files straight from S3 after the permission check instead of through one "
        "presigned URL per file; off: presigned URLs, as against an external server.",
    )

    @property
    def sessions_dir(self) -> Path:
        """Training sessions."""
        return self.data_dir / "sessions"

    @property
    def models_dir(self) -> Path:
        """Checkpoints offered by name (file stem)."""
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        """Downloaded dataset files."""
        return self.data_dir / "cache"
