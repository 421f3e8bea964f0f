"""The lock files: every dependency pinned with hashes, in step with pyproject.toml.

``make lock`` writes them (it needs the package index, so it is not run here); these checks
catch a dependency added to pyproject.toml without re-locking, and a torch that crept into the
agent's lock.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"


def _name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement (PEP 503 normalization)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def parse_lock(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (pinned versions, hashes) of a requirements file with hashes."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("--hash") else raw.strip()
        if not line:
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{path.name}: a hash before any requirement"
            found[current][1].append(line.removeprefix("--hash=").rstrip(" \\"))
            continue
        spec = line.rstrip(" \\").split(";")[0].strip()
        assert "==" in spec, f"{path.name}: {spec!r} is not pinned with =="
        name, version = spec.split("==", 1)
        current = _name(name)
        found.setdefault(current, ([], []))[0].append(version.strip())
    return found


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"core": project["dependencies"], **project["optional-dependencies"]}


def _closure(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """The third-party names an extra pulls in, following edgectl[...] self-references."""
    names: set[str] = set()
    for req in extras[extra] + (extras["core"] if extra != "core" else []):
        if _name(req) == "edgectl":
            inner = re.search(r"\[(.*?)\]", req)
            for sub in inner.group(1).split(",") if inner else []:
                names |= _closure(sub.strip(), extras)
        else:
            names.add(_name(req))
    return names


@pytest.mark.parametrize("lock", ["dev.lock", "agent.lock"])
def test_every_entry_is_pinned_with_a_hash(lock: str) -> None:
    entries = parse_lock(LOCKS / lock)
    assert len(entries) > 10
    unhashed = sorted(name for name, (_, hashes) in entries.items() if not hashes)
    assert unhashed == [], f"{lock}: no hash for {unhashed}"
    assert all(h.startswith("sha256:") for _, hashes in entries.values() for h in hashes)


@pytest.mark.parametrize(("lock", "extra"), [("dev.lock", "dev"), ("agent.lock", "agent")])
def test_the_lock_covers_what_pyproject_asks_for(lock: str, extra: str) -> None:
    missing = _closure(extra, _extras()) - set(parse_lock(LOCKS / lock))
    assert missing == set(), f"{lock} lacks {sorted(missing)}: run `make lock`"


def test_the_dev_lock_installs_its_own_build_tools() -> None:
    # `make setup` installs edgectl with --no-build-isolation: the back-end must come from the lock.
    assert {"pip", "setuptools", "wheel"} <= set(parse_lock(LOCKS / "dev.lock"))


def test_the_agent_lock_has_no_torch_and_nothing_of_compress() -> None:
    extras = _extras()
    compress_only = _closure("compress", extras) - _closure("agent", extras)
    assert "torch" in compress_only  # positive control: the set really names the heavy stack
    leaked = compress_only & set(parse_lock(LOCKS / "agent.lock"))
    assert leaked == set(), f"the agent's lock pulls in {sorted(leaked)}"


def test_the_locks_honour_the_pins_of_constraints_dev() -> None:
    pins = {
        _name(line): line.split("==", 1)[1].strip()
        for line in (ROOT / "constraints-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for lock in ("dev.lock", "agent.lock"):
        entries = parse_lock(LOCKS / lock)
        for name, version in pins.items():
            if name in entries:
                # torch==2.13.0 is met by the local CPU build 2.13.0+cpu (a PEP 440 local version).
                assert all(v.split("+")[0] == version for v in entries[name][0]), (lock, name)


def test_parse_lock_refuses_an_unpinned_or_unhashed_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy>=1.26 \\\n    --hash=sha256:00\n")
    with pytest.raises(AssertionError, match="not pinned"):
        parse_lock(bad)
    bare = tmp_path / "bare.lock"
    bare.write_text("numpy==2.0.0\n")
    assert parse_lock(bare) == {"numpy": (["2.0.0"], [])}
