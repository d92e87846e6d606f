"""corral: supervise AI-agent workers in Docker containers. The public API."""

from .logging import library_defaults as _library_defaults

_library_defaults()     # silent unless the application configures logging (runtime.logging)

from .api import open_supervisor as open_supervisor  # noqa: E402
from .errors import ConfigError as ConfigError
from .errors import ContainerNotFound as ContainerNotFound
from .errors import CorralError as CorralError
from .errors import EngineError as EngineError
from .errors import EngineUnavailable as EngineUnavailable
from .errors import ImageBuildError as ImageBuildError
from .errors import ImageNotFound as ImageNotFound
from .errors import NameConflict as NameConflict
from .errors import ProtocolError as ProtocolError
from .errors import SupervisorEscalation as SupervisorEscalation
from .errors import ActorStopped as ActorStopped
from .errors import BuilderStopped as BuilderStopped
from .errors import NoSuchChild as NoSuchChild
from .errors import PoolStopped as PoolStopped
from .errors import SupervisorStopped as SupervisorStopped
from .errors import WorkerGone as WorkerGone
from .errors import WorkerStartupError as WorkerStartupError
from .instance import AlreadyRunning as AlreadyRunning
from .records import DeathCertificate as DeathCertificate
from .records import TokenUsage as TokenUsage
from .records import PoolSnapshot as PoolSnapshot
from .records import SupervisorSnapshot as SupervisorSnapshot
from .records import TaskResult as TaskResult
from .records import WorkerInfo as WorkerInfo
from .records import WorkerSnapshot as WorkerSnapshot
from .specs import Backoff as Backoff
from .specs import EnvSecret as EnvSecret
from .specs import PoolSpec as PoolSpec
from .specs import RestartPolicy as RestartPolicy
from .specs import SupervisorConfig as SupervisorConfig
from .specs import Task as Task
from .specs import WorkerSpec as WorkerSpec
