"""Agent packages: fetched with the host's npm (here a fake one on PATH), verified, cached."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import trio

from runtime.agentpkgs import (AGENT_PACKAGES, AgentPackage, AgentPackageError, cache_key,
                               cached_files, ensure_agent_files, package_for, sri_sha512)
from runtime.errors import ConfigError

FAKE_NPM = r"""#!/bin/sh
# a stand-in for npm: `npm pack --json --pack-destination DEST SPEC`
echo "$*" >> "$FAKE_NPM_LOG"
[ -n "$FAKE_NPM_DELAY" ] && sleep "$FAKE_NPM_DELAY"
case "$FAKE_NPM_MODE" in
  offline)
    echo "npm error code ENOTFOUND" >&2
    echo "npm error network request to the registry failed, reason: getaddrinfo ENOTFOUND" >&2
    exit 1;;
  missing)
    echo "npm error code ETARGET" >&2
    echo "npm error notarget No matching version found" >&2
    exit 1;;
esac
dest=""
while [ $# -gt 0 ]; do
  case "$1" in --pack-destination) dest="$2"; shift;; esac
  shift
done
cp "$FAKE_NPM_TARBALL" "$dest/fake-agent-1.0.0.tgz"
echo '[{"filename": "fake-agent-1.0.0.tgz"}]'
"""


def make_tarball(path: Path, files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith("/fake") else 0o644
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return sri_sha512(path)


FILES = {"package/package.json": b'{"name": "@corral-test/fake-agent", "version": "1.0.0"}',
         "package/bin/fake": b"#!/bin/sh\necho fake 1.0.0\n",
         "package/extras/big.bin": b"\0" * 4096}


@pytest.fixture
def npm(tmp_path, monkeypatch):
    """A fake npm first on PATH, serving a tarball; returns (pin, call log)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "npm"
    script.write_text(FAKE_NPM)
    script.chmod(0o755)
    tarball = tmp_path / "fake-agent-1.0.0.tgz"
    integrity = make_tarball(tarball, FILES)
    log = tmp_path / "npm.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NPM_TARBALL", str(tarball))
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    monkeypatch.setenv("FAKE_NPM_MODE", "ok")
    pin = AgentPackage(agent="fake", name="@corral-test/fake-agent", version="1.0.0",
                       integrity=integrity, entry="bin/fake", exclude=("extras/",))
    return pin, log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


async def test_a_cold_cache_fetches_verifies_and_unpacks(npm, tmp_path):
    pin, log = npm
    cache = tmp_path / "cache"
    seen = []
    files = await ensure_agent_files(pin, cache_dir=cache, progress=seen.append)
    assert len(calls(log)) == 1
    assert calls(log)[0].startswith(f"pack --json --pack-destination {cache}/.fetch-")
    assert calls(log)[0].endswith(" @corral-test/fake-agent@1.0.0")
    assert files.root == cache / cache_key(pin) / "package"
    assert files.binary.read_bytes() == FILES["package/bin/fake"]
    assert files.binary.stat().st_mode & stat.S_IXUSR
    assert not (files.root / "extras").exists()               # excluded from the unpack
    assert (files.version, files.integrity, files.entry) == ("1.0.0", pin.integrity, "bin/fake")
    phases = [p.phase for p in seen]
    assert phases[0] == "fetching" and phases[-1] == "ready"
    assert {"verifying", "unpacking"} <= set(phases)
    assert [p.name for p in cache.iterdir()] == [cache_key(pin)]  # no leftovers


async def test_a_cache_hit_runs_no_npm(npm, tmp_path, monkeypatch):
    pin, log = npm
    cache = tmp_path / "cache"
    first = await ensure_agent_files(pin, cache_dir=cache)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))         # no npm at all now
    seen = []
    again = await ensure_agent_files(pin, cache_dir=cache, progress=seen.append)
    assert again == first and len(calls(log)) == 1
    assert [p.phase for p in seen] == ["cached"]
    assert cached_files(pin, cache) == first


async def test_an_integrity_mismatch_is_refused_and_not_cached(npm, tmp_path):
    pin, log = npm
    wrong = AgentPackage(agent="fake", name=pin.name, version=pin.version,
                         integrity="sha512-" + "A" * 86 + "==", entry=pin.entry)
    cache = tmp_path / "cache"
    with pytest.raises(AgentPackageError, match=r"@corral-test/fake-agent@1\.0\.0: integrity "
                                                r"mismatch") as info:
        await ensure_agent_files(wrong, cache_dir=cache)
    assert pin.integrity in str(info.value)                       # what was actually fetched
    assert list(cache.iterdir()) == []
    assert cached_files(wrong, cache) is None


async def test_offline_with_a_cold_cache_names_the_package(npm, tmp_path, monkeypatch):
    pin, _ = npm
    monkeypatch.setenv("FAKE_NPM_MODE", "offline")
    with pytest.raises(AgentPackageError) as info:
        await ensure_agent_files(pin, cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert "cannot fetch @corral-test/fake-agent@1.0.0 for agent 'fake'" in text
    assert "cannot be reached (offline?)" in text and "ENOTFOUND" in text
    assert str(tmp_path / "cache") in text


async def test_a_version_the_registry_lacks_is_said_so(npm, tmp_path, monkeypatch):
    pin, _ = npm
    monkeypatch.setenv("FAKE_NPM_MODE", "missing")
    with pytest.raises(AgentPackageError, match="registry does not have this version"):
        await ensure_agent_files(pin, cache_dir=tmp_path / "cache")


async def test_no_npm_and_a_cold_cache_names_the_package(npm, tmp_path, monkeypatch):
    pin, _ = npm
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AgentPackageError, match=r"cannot fetch @corral-test/fake-agent@1\.0\.0 "
                                                r".*npm is not installed"):
        await ensure_agent_files(pin, cache_dir=tmp_path / "cache")


async def test_concurrent_requests_share_one_fetch(npm, tmp_path, monkeypatch):
    pin, log = npm
    monkeypatch.setenv("FAKE_NPM_DELAY", "0.3")
    results = []

    async def one():
        results.append(await ensure_agent_files(pin, cache_dir=tmp_path / "cache"))

    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(one)
    assert len(calls(log)) == 1 and len(set(map(str, (r.root for r in results)))) == 1


async def test_a_broken_cache_entry_is_fetched_again(npm, tmp_path):
    pin, log = npm
    cache = tmp_path / "cache"
    files = await ensure_agent_files(pin, cache_dir=cache)
    files.binary.unlink()
    assert cached_files(pin, cache) is None
    again = await ensure_agent_files(pin, cache_dir=cache)
    assert again.binary.is_file() and len(calls(log)) == 2


@pytest.mark.parametrize("bad", ["symlink", "dotdot", "outside"])
async def test_unsafe_tarballs_are_refused(npm, tmp_path, monkeypatch, bad):
    pin, _ = npm
    tarball = tmp_path / "bad.tgz"
    if bad == "symlink":
        link = tarfile.TarInfo("package/bin/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        integrity = make_tarball(tarball, FILES, extra=[link])
    elif bad == "dotdot":
        integrity = make_tarball(tarball, {**FILES, "package/../../evil": b"x"})
    else:
        integrity = make_tarball(tarball, {**FILES, "elsewhere/evil": b"x"})
    monkeypatch.setenv("FAKE_NPM_TARBALL", str(tarball))
    pin = AgentPackage(agent="fake", name=pin.name, version=pin.version, integrity=integrity,
                       entry=pin.entry)
    with pytest.raises(AgentPackageError, match="unsafe path|unexpected"):
        await ensure_agent_files(pin, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil").exists()
    assert list((tmp_path / "cache").iterdir()) == []


async def test_a_package_without_its_entry_is_refused(npm, tmp_path):
    pin, _ = npm
    moved = AgentPackage(agent="fake", name=pin.name, version=pin.version,
                         integrity=pin.integrity, entry="bin/elsewhere")
    with pytest.raises(AgentPackageError, match="has no bin/elsewhere"):
        await ensure_agent_files(moved, cache_dir=tmp_path / "cache")


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from runtime.agentpkgs import default_cache_dir
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "agents"
    monkeypatch.delenv("CORRAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "corral" / "agents"


def test_pins_are_complete_and_feed_the_image_hash():
    assert set(AGENT_PACKAGES) == {"claude", "codex", "factory"}
    for agent, pin in AGENT_PACKAGES.items():
        assert pin.agent == agent and pin.integrity.startswith("sha512-")
        assert len(pin.integrity) == len("sha512-") + 88
        inputs = pin.image_inputs()
        assert inputs["integrity"] == pin.integrity and inputs["version"] == pin.version
    a = AGENT_PACKAGES["claude"]
    b = AgentPackage(**{**{f: getattr(a, f) for f in a.__struct_fields__},
                        "integrity": "sha512-" + "B" * 86 + "=="})
    assert cache_key(a) != cache_key(b) and a.image_inputs() != b.image_inputs()
    with pytest.raises(ConfigError, match="known: claude, codex, factory"):
        package_for("shell")
