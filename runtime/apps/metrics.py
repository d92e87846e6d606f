"""Prometheus metrics of a supervisor (``GET /metrics`` of `corral run`), with prometheus_client.

Counters and histograms are fed by the tree's lifecycle events (`runtime.events`), as they are
published; gauges (workers by state, pool queues) are read from the tree when scraped, so an idle
tree costs nothing between scrapes. Each `Metrics` has its own registry (several supervisors in
one process do not mix).

  corral_workers{state}                       gauge: workers by state
  corral_pool_replicas{pool}, corral_pool_queued_tasks{pool}
  corral_worker_deaths_total{cause}           containers that died, by cause
  corral_restarts_total{cause}                restarts, by the cause of death (``requested``: asked for)
  corral_restart_latency_seconds              histogram: a container's death (or a restart asked
                                              for) until the worker is READY again
  corral_escalations_total{reason}            supervisors that gave up
  corral_tasks_total{pool,status}             tasks ended, by pool ("" for a worker's own) and status
  corral_task_duration_seconds{pool}          histogram: a task's run time in its container
  corral_task_queue_wait_seconds{pool}        histogram: accepted until first sent to a container
  corral_gateway_requests_total{status}       model API requests through the gateway, by upstream
                                              status ("none": no answer)
  corral_gateway_tokens_total{direction,status}  tokens (input/output) the model API reported
  corral_image_build_duration_seconds         histogram: worker image builds
"""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from ..events import (Event, EventBus, GatewayExchange, ImageBuilt, SupervisorEscalated, TaskDone,
                      TaskQueued, TaskStarted, WorkerDied, WorkerRestarting, WorkerStateChanged)
from ..records import PoolSnapshot, SupervisorSnapshot, WorkerSnapshot

_PENDING_MAX = 100_000
_QUICK = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TASKS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_BUILDS = (1, 5, 10, 30, 60, 120, 300, 600, 1800)


def _pool_of(target: str) -> str:
    kind, _, name = target.partition(":")
    return name if kind == "pool" else ""


class _TreeCollector:
    """Gauges read from the tree at scrape time."""

    def __init__(self, snapshot) -> None:
        self._snapshot = snapshot

    def collect(self):
        states: dict[str, int] = {}
        replicas = GaugeMetricFamily("corral_pool_replicas", "Workers of a pool", labels=["pool"])
        queued = GaugeMetricFamily("corral_pool_queued_tasks", "Tasks waiting in a pool's queue",
                                   labels=["pool"])

        def walk(node: Any) -> None:
            if isinstance(node, WorkerSnapshot):
                states[node.info.state] = states.get(node.info.state, 0) + 1
            elif isinstance(node, PoolSnapshot):
                replicas.add_metric([node.name], node.replicas)
                queued.add_metric([node.name], node.queued)
                for w in node.workers:
                    walk(w)
            elif isinstance(node, SupervisorSnapshot):
                for c in node.children:
                    walk(c)
        walk(self._snapshot())
        workers = GaugeMetricFamily("corral_workers", "Workers by state", labels=["state"])
        for state in ("pending", "building", "creating", "starting", "ready", "busy", "backoff",
                      "held", "stopping", "engine_down"):
            states.setdefault(state, 0)
        for state, n in sorted(states.items()):
            workers.add_metric([state], n)
        yield workers
        yield replicas
        yield queued


class Metrics:
    def __init__(self, bus: EventBus | None = None, snapshot=None) -> None:
        self.registry = r = CollectorRegistry()
        if snapshot is not None:
            r.register(_TreeCollector(snapshot))
        self.deaths = Counter("corral_worker_deaths", "Worker containers that died, by cause",
                              ["cause"], registry=r)
        self.restarts = Counter("corral_restarts", "Worker restarts, by the cause of death "
                                "(requested: a restart asked for)", ["cause"], registry=r)
        self.restart_latency = Histogram("corral_restart_latency_seconds", "From a container's "
                                         "death (or a restart asked for) until the worker is READY "
                                         "again", buckets=_QUICK, registry=r)
        self.escalations = Counter("corral_escalations", "Supervisors that escalated, by reason",
                                   ["reason"], registry=r)
        self.tasks = Counter("corral_tasks", "Tasks ended, by pool and status", ["pool", "status"],
                             registry=r)
        self.task_duration = Histogram("corral_task_duration_seconds", "Task run time in its "
                                       "container", ["pool"], buckets=_TASKS, registry=r)
        self.queue_wait = Histogram("corral_task_queue_wait_seconds", "From a task's acceptance "
                                    "until it is first sent to a container", ["pool"],
                                    buckets=_QUICK, registry=r)
        self.gateway_requests = Counter("corral_gateway_requests", "Model API requests through "
                                        "the gateway, by upstream status", ["status"], registry=r)
        self.gateway_tokens = Counter("corral_gateway_tokens", "Tokens the model API reported, "
                                      "by direction and upstream status", ["direction", "status"],
                                      registry=r)
        self.builds = Histogram("corral_image_build_duration_seconds", "Worker image builds",
                                buckets=_BUILDS, registry=r)
        self._queued: dict[str, float] = {}
        self._dead: dict[str, float] = {}
        self._unsubscribe = bus.subscribe(self.observe, replay=True) if bus is not None else None

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, ev: Event) -> None:
        """One lifecycle event (the bus calls this at each publish)."""
        now = trio.current_time()
        match ev:
            case WorkerStateChanged(worker_id=wid, state="ready"):
                t = self._dead.pop(wid, None)
                if t is not None:
                    self.restart_latency.observe(now - t)
            case WorkerDied(worker_id=wid, certificate=cert, decision=decision):
                self.deaths.labels(cert.cause).inc()
                if decision == "restart":
                    self._dead[wid] = now
            case WorkerRestarting(worker_id=wid, cause=cause):
                self.restarts.labels(cause).inc()
                if cause == "requested":
                    self._dead[wid] = now
            case SupervisorEscalated(reason=reason):
                self.escalations.labels(reason or "unknown").inc()
            case TaskQueued(task_id=tid):
                if len(self._queued) >= _PENDING_MAX:
                    self._queued.pop(next(iter(self._queued)))
                self._queued[tid] = now
            case TaskStarted(task_id=tid, pool=pool):
                t = self._queued.pop(tid, None)
                if t is not None:
                    self.queue_wait.labels(pool or "").observe(now - t)
            case TaskDone(task_id=tid, target=target, status=status, duration_s=d):
                self._queued.pop(tid, None)
                pool = _pool_of(target)
                self.tasks.labels(pool, status).inc()
                if status in ("ok", "error", "timeout"):
                    self.task_duration.labels(pool).observe(d)
            case GatewayExchange(status=status, input_tokens=i, output_tokens=o):
                s = str(status) if status is not None else "none"
                self.gateway_requests.labels(s).inc()
                if i:
                    self.gateway_tokens.labels("input", s).inc(i)
                if o:
                    self.gateway_tokens.labels("output", s).inc(o)
            case ImageBuilt(seconds=s):
                self.builds.observe(s)
            case _:
                pass
        if len(self._dead) > _PENDING_MAX:
            self._dead.pop(next(iter(self._dead)))
