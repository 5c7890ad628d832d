"""Case 4: the Ray backend (``cellpose_finetuning.deploy.ray_backend``), once it exists.

TODO (fill in when the Ray executor lands):

- **Added cost per ``infer`` call over the engine**: the same image (e.g.
  ``common.dev_image(512)``) and model (``fixtures.cells_model``) through the
  Ray backend against ``engine.inference.segment`` in-process, interleaved,
  median of ~50 calls each. Row: ours = Ray call time, reference = engine
  time, plus the difference (ours − reference). Target: difference < 20 ms.
- **Concurrency**: 20 concurrent ``infer`` calls with 1 replica and with 2
  replicas: wall time for all 20 and per-call p50/p95. Reference: the same
  20 images segmented one after the other by the engine. Report the speed-up
  of 2 replicas over 1 (bounded by the cores: 2 on the reference machine).
- Each side in its own process (the Ray cluster started and stopped by the
  case, even on errors), torch threads :data:`common.THREADS` split between
  replicas.

Until then the case returns one row "skipped: Ray backend not installed".
"""

from __future__ import annotations

from common import CaseResult, Context, skipped

TITLE = "Ray backend"


def run(ctx: Context) -> CaseResult:
    """Skip unless the Ray backend can be imported (nothing is measured yet)."""
    try:
        import cellpose_finetuning.deploy.ray_backend  # noqa: F401
    except ImportError:
        return skipped("ray", TITLE, "Ray backend not installed")
    # TODO: measure as the module docstring says once the backend exists.
    return skipped(
        "ray",
        TITLE,
        "Ray backend importable, not measured yet (TODO in benchmarks/bench_ray.py)",
    )
