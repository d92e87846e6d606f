"""corral's chaos-testing kit: a seeded fault schedule, the history of what happened, the
invariants a supervision tree keeps under faults, and the harness that holds them together.

The pytest plugin (``runtime.chaoskit.plugin``, registered through the ``pytest11`` entry point)
gives them as fixtures: ``corral_engine``, ``corral_supervisor``, ``chaos``, ``invariants``, and
``private_docker`` (``runtime.chaoskit.dockerd``: a dockerd of the tests' own, which they may
stop and restart).
``runtime.chaoskit.stateful`` has the Hypothesis state machine (needs the test extra).
"""

from .dockerd import DockerdError as DockerdError
from .dockerd import PrivateDockerd as PrivateDockerd
from .dockerd import private_dockerd as private_dockerd
from .harness import Harness as Harness
from .harness import SupervisorFactory as SupervisorFactory
from .harness import open_harness as open_harness
from .history import Fault as Fault
from .history import History as History
from .invariants import INVARIANTS as INVARIANTS
from .invariants import InvariantViolation as InvariantViolation
from .invariants import Invariants as Invariants
from .invariants import Violation as Violation
from .schedule import EXPECTED as EXPECTED
from .schedule import FAULTS as FAULTS
from .schedule import Chaos as Chaos
from .schedule import ChaosError as ChaosError
