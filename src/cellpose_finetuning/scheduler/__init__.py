"""Scheduling for the service: who trains and who segments when, fairly between users.

The layer above the engine (it imports :mod:`cellpose_finetuning.engine`; the
engine knows nothing of it) and below the service and the deployments:

- :mod:`~cellpose_finetuning.scheduler.queue`: :class:`SessionQueue`, the
  fair, bounded queue of training sessions (round robin by owner, time slicing);
- :mod:`~cellpose_finetuning.scheduler.gate`: :class:`FairGate`, at most a
  few ``infer`` calls at once, served fairly between users;
- :mod:`~cellpose_finetuning.scheduler.executors`: the executor interfaces the
  service talks to (:class:`TrainingExecutor`, :class:`InferenceExecutor`) and
  their local implementations (:class:`TrainingQueue`: worker processes;
  :class:`LocalInference`: threads). The Ray backend
  (:mod:`cellpose_finetuning.deploy.ray_backend`) provides the others.
"""

from cellpose_finetuning.scheduler.executors import (
    InferenceExecutor,
    LocalInference,
    TrainingExecutor,
    TrainingQueue,
)
from cellpose_finetuning.scheduler.gate import FairGate
from cellpose_finetuning.scheduler.queue import SessionQueue

__all__ = [
    "FairGate",
    "InferenceExecutor",
    "LocalInference",
    "SessionQueue",
    "TrainingExecutor",
    "TrainingQueue",
]
