"""BioEngine entry deployment of cellpose-finetuning.

BioEngine introspects this module with only ``bioengine[worker]`` and the
standard library, so the package (``cellpose_finetuning``, with torch and
cellpose) is imported inside the methods; the replicas install it from the
wheel listed in ``requirements-app.txt``.

Outside a BioEngine worker (``import bioengine`` fails: tests, or wrapping the
class in ``ray.serve.deployment`` by hand) the decorators are left out and
the class is plain Python with the same methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:  # the BioEngine authoring API, present on BioEngine workers
    import bioengine
except ImportError:  # pragma: no cover - depends on the environment
    bioengine = None


def _read_pip(name: str) -> list[str]:
    """The requirements listed in ``name`` next to this module."""
    path = Path(__file__).parent / name
    if not path.is_file():
        return []
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _app(**options: Any) -> Any:
    return bioengine.app(**options) if bioengine is not None else (lambda cls: cls)


def _method(func: Any) -> Any:
    return bioengine.method(func) if bioengine is not None else func


def _async_init(func: Any) -> Any:
    return bioengine.async_init(func) if bioengine is not None else func


@_app(
    num_cpus=2,
    gpu_memory_mb=-1,
    memory_mb=8 * 1024,
    pip=_read_pip("requirements-app.txt"),
    max_ongoing_requests=16,
    health_check_period_s=30.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=120.0,
)
class CellposeFinetuningApp:
    """Registers the per-user ``cellpose-finetuning`` service and answers identity-free calls.

    Parameters
    ----------
    max_concurrent_trainings : int
        Training sessions that run at once.
    max_active_sessions_per_user : int
        Unfinished sessions one user may have.
    training_on_ray : bool
        Train as Ray tasks (their own resources) instead of processes next to this replica.
    training_gpus : float
        GPUs each Ray training task asks for.
    """

    def __init__(
        self,
        max_concurrent_trainings: int = 1,
        max_active_sessions_per_user: int = 3,
        training_on_ray: bool = False,
        training_gpus: float = 0.0,
    ) -> None:
        from cellpose_finetuning.deploy.bioengine import AppCore

        self.core = AppCore(
            # unset: AppCore's default, $HOME/cellpose-finetuning
            os.environ.get("CELLPOSE_FINETUNING_DATA") or None,
            service_config={
                "max_concurrent_trainings": max_concurrent_trainings,
                "max_active_sessions_per_user": max_active_sessions_per_user,
            },
            training_on_ray=training_on_ray,
            training_gpus=training_gpus,
        )

    @_async_init
    async def register(self) -> None:
        """Register the per-user service on the Hypha server BioEngine runs on."""
        await self.core.start()

    @_method
    async def list_pretrained_models(self) -> list[str]:
        """List the pretrained models: 'cpsam' and the checkpoints this app offers by name."""
        return await self.core.list_pretrained_models()

    @_method
    async def get_training_capabilities(self) -> dict[str, Any]:
        """Describe trainable models and every training parameter (type, default, bounds)."""
        return await self.core.get_training_capabilities()

    @_method
    async def get_service_info(self) -> dict[str, Any]:
        """Where the per-user service (training, sessions, export, infer) is registered."""
        return self.core.service_info()
