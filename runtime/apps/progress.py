"""Progress where people wait (`corral build`, `base-image`, agent fetching, `bench`): rich bars
and spinners on a TTY, plain lines otherwise (a CI log, a pipe).

The builder reports through its log events (``agent_package`` with bytes fetched,
``image_build_progress`` with Dockerfile steps, ``image_built``); `Progress.processor` is a
structlog processor that turns those into progress and keeps them off the log."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

import structlog

_STEP = re.compile(r"Step (\d+)/(\d+) ?: ?(.*)")


class Progress:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._bars: dict[str, Any] = {}
        self._rich = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                       SpinnerColumn, TextColumn, TimeElapsedColumn)
            self._rich = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), TextColumn("{task.fields[detail]}"),
                                      TimeElapsedColumn(),
                                      console=Console(file=self.stream), transient=False)
            self._download = DownloadColumn
            self._rich.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def update(self, key: str, description: str, *, done: float | None = None,
               total: float | None = None, detail: str = "") -> None:
        """A bar (``total`` known) or a spinner (not known) for ``key``; plain: one line."""
        if self._rich is None:
            frac = f" {done:.0f}/{total:.0f}" if done is not None and total else ""
            print(f"[corral] {description}{frac}{': ' + detail if detail else ''}",
                  file=self.stream, flush=True)
            return
        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = self._rich.add_task(description, total=total, detail=detail)
        self._rich.update(bar, description=description, completed=done, total=total,
                          detail=detail[:60])

    def finish(self, key: str, description: str) -> None:
        if self._rich is None:
            print(f"[corral] {description}", file=self.stream, flush=True)
            return
        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = self._rich.add_task(description, total=1, detail="")
        task = self._rich.tasks[[t.id for t in self._rich.tasks].index(bar)]
        self._rich.update(bar, description=description, completed=task.total or 1,
                          total=task.total or 1, detail="")

    def processor(self, logger: Any, name: str, ev: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor: the builder's progress events become progress here."""
        event = ev.get("event")
        if event == "agent_package":
            total = ev.get("total_mb")
            self.update(f"pkg:{ev.get('package')}", f"{ev.get('phase')} {ev.get('package')}",
                        done=ev.get("done_mb"), total=total,
                        detail=f"{ev.get('done_mb')}/{total} MB" if total else "")
            raise structlog.DropEvent
        if event == "image_build_progress":
            m = _STEP.match(str(ev.get("line", "")))
            if m:
                self.update(f"build:{ev.get('tag')}", f"building {ev.get('tag')}",
                            done=int(m.group(1)), total=int(m.group(2)), detail=m.group(3))
            raise structlog.DropEvent
        if event == "image_build_started":
            self.update(f"build:{ev.get('tag')}", f"building {ev.get('tag')}")
            raise structlog.DropEvent
        if event == "image_built":
            self.finish(f"build:{ev.get('tag')}", f"built {ev.get('tag')} in {ev.get('seconds')} s")
            raise structlog.DropEvent
        return ev

    def hook_logging(self) -> None:
        """Put `processor` first in structlog's chain (the CLI's configuration)."""
        cfg = structlog.get_config()
        structlog.configure(processors=[self.processor] + list(cfg["processors"]))
