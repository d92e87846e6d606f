"""The Worker actor, one concern per module (see actor.py)."""

from .actor import Worker as Worker
from .handle import WorkerHandle as WorkerHandle
from .life import container_name as container_name
