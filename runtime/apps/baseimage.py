"""Build `corral/worker-base` offline from Debian packages: debootstrap minbase + `docker import`.

No container registry is involved. The Debian mirror comes from CORRAL_DEBIAN_MIRROR, an explicit
option, or the machine's own apt sources.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable

import trio

from ..engines import Engine
from ..errors import ConfigError, ImageBuildError, ImageNotFound
from ..logging import get_logger

BASE_REPO = "corral/worker-base"
BASE_TAG = "latest"
BASE_REF = f"{BASE_REPO}:{BASE_TAG}"
SUITE = "bookworm"
PACKAGES = ["python3", "git", "curl", "ca-certificates"]
WORKER_USER = "worker"
WORKER_UID = 1000

log = get_logger("corral.base")


def debian_mirror(explicit: str | None = None) -> str:
    """The Debian mirror: explicit, else $CORRAL_DEBIAN_MIRROR, else the machine's apt sources."""
    if explicit:
        return explicit
    if os.environ.get("CORRAL_DEBIAN_MIRROR"):
        return os.environ["CORRAL_DEBIAN_MIRROR"]
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in re.split(r"\n\s*\n", f.read()):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "deb").split() and SUITE in suites and fields.get("uris"):
                    return fields["uris"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == SUITE:
                        return rest[0]
    raise ConfigError("no Debian mirror found: set CORRAL_DEBIAN_MIRROR or pass --mirror "
                      f"(no '{SUITE}' entry in /etc/apt/sources.list*)")


async def _run(cmd: list[str], step: str, progress: Callable[[str], None]) -> None:
    """Run cmd, streaming its output lines to ``progress``; failure raises ImageBuildError."""
    tail: list[str] = []
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
            task_status=task_status))
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                del tail[:-40]
                progress(line)
        await proc.wait()
    if proc.returncode != 0:
        raise ImageBuildError(f"building {BASE_REF} failed (exit {proc.returncode})", step=step,
                              output_tail="\n".join(tail))


async def build_base_image(engine: Engine, *, mirror: str | None = None, if_missing: bool = False,
                           progress: Callable[[str], None] | None = None) -> str:
    """Build corral/worker-base and return its image id (reused when ``if_missing`` and present)."""
    if if_missing:
        try:
            return (await engine.image_inspect(BASE_REF)).id
        except ImageNotFound:
            pass
    if os.geteuid() != 0:
        raise ImageBuildError(f"building {BASE_REF} needs root (debootstrap and chroot)")
    if not shutil.which("debootstrap"):
        raise ImageBuildError(f"building {BASE_REF} needs debootstrap: apt-get install debootstrap")
    mirror = debian_mirror(mirror)
    emit = progress or (lambda line: log.info("base_image_progress", line=line))
    work = tempfile.mkdtemp(prefix="corral-base-", dir="/var/tmp")
    root = os.path.join(work, "rootfs")
    try:
        log.info("base_image_build_started", suite=SUITE, packages=PACKAGES)
        await _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                    SUITE, root, mirror], "debootstrap", emit)
        script = (
            f"set -e; useradd --uid {WORKER_UID} --user-group --create-home --shell /bin/bash {WORKER_USER}; "
            f"mkdir -p /workspace /opt/corral; chown {WORKER_USER}:{WORKER_USER} /workspace; "
            "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log "
            "/var/cache/debconf/*-old /tmp/*; true"
        )
        await _run(["chroot", root, "/bin/sh", "-c", script], "add user worker, clean apt caches", emit)
        tar = os.path.join(work, "rootfs.tar")
        await _run(["tar", "-C", root, "--numeric-owner", "-cf", tar, "."], "tar rootfs", emit)
        emit(f"importing {tar} as {BASE_REF}")
        image_id = await engine.image_import(
            tar, repo=BASE_REPO, tag=BASE_TAG,
            changes=["WORKDIR /workspace", "ENV LANG=C.UTF-8",
                     "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "LABEL corral.base=1", f"LABEL corral.base.suite={SUITE}",
                     'CMD ["/bin/bash"]'],
            message=f"corral worker base: debian {SUITE} minbase + {' '.join(PACKAGES)}")
        log.info("base_image_built", image=BASE_REF, image_id=image_id)
        return image_id
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, work, True)
