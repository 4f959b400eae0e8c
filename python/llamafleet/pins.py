"""Do the lock's pins exist on the package index? Asked on the controller before any node installs.

One request per project to the index's PEP 503 simple page (and a directory listing for local
find-links), in parallel; a pin exists when some file of the project carries that version. The
answer for a lock hash is cached under the state directory, so it is asked once per lock.
"""

from __future__ import annotations

import concurrent.futures
import html
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from .lock import Stack, canonical_name

DEFAULT_INDEX = "https://pypi.org/simple"
_HREF = re.compile(r"<a [^>]*>([^<]+)</a>", re.I)


def _file_version(project: str, filename: str) -> str | None:
    """Version in a wheel or sdist file name of ``project`` (names compared PEP 503-normalized)."""
    base = filename.strip()
    for ext in (".whl", ".tar.gz", ".zip", ".tar.bz2"):
        if base.endswith(ext):
            stem = base[: -len(ext)]
            break
    else:
        return None
    parts = stem.split("-")
    for i in range(1, len(parts)):
        if canonical_name("-".join(parts[:i])) == project:
            return parts[i]
    return None


def _listing(source: str, project: str, timeout: float) -> list[str]:
    """File names a source offers for a project: an http(s) simple index page, a local simple index
    (``<dir>/<project>/``) or a find-links directory of wheels and sdists."""
    if source.startswith(("http://", "https://")):
        url = source.rstrip("/") + f"/{project}/"
        req = urllib.request.Request(url, headers={"User-Agent": "llamafleet"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                page = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        return [html.unescape(m.group(1)) for m in _HREF.finditer(page)]
    path = Path(source[len("file://"):] if source.startswith("file://") else source)
    if (path / project).is_dir():
        page = path / project / "index.html"
        if page.is_file():
            return [html.unescape(m.group(1)) for m in _HREF.finditer(page.read_text("utf-8", "replace"))]
        path = path / project
    return [p.name for p in path.iterdir()] if path.is_dir() else []


def missing_pins(stack: Stack, sources: list[str] | None = None, timeout: float = 20.0) -> list[str]:
    """Pins (``name==version``) found on none of the sources. Network errors propagate as OSError."""
    if sources is None:
        sources = [stack.pip.index_url or DEFAULT_INDEX, *stack.pip.extra_index_urls, *stack.pip.find_links]
    wanted = {n: v for n, v in stack.packages.items() if n not in stack.system_provided}

    def versions(project: str) -> set[str]:
        found: set[str] = set()
        for src in sources:
            for fn in _listing(src, project, timeout):
                v = _file_version(project, fn)
                if v:
                    found.add(v)
        return found

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        listed = dict(zip(wanted, pool.map(versions, wanted)))
    out = []
    for name, pin in sorted(wanted.items()):
        have = listed[name]
        if pin not in have and not ("+" not in pin and any(v.split("+", 1)[0] == pin for v in have)):
            out.append(f"{name}=={pin}")
    return out


def verify_cached(stack: Stack, cache_dir: str | os.PathLike, sources: list[str] | None = None) -> list[str]:
    """``missing_pins`` remembered per lock hash when nothing is missing (a good answer does not change)."""
    cache = Path(cache_dir) / f"pins-{stack.hash}.json"
    if cache.is_file():
        return []
    missing = missing_pins(stack, sources)
    if not missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"hash": stack.hash, "verified": sorted(stack.packages)}))
    return missing


def linux_platforms(machine: str, glibc: str | None) -> tuple[str, ...]:
    """The wheel platform tags pip takes on a Linux node of this machine (``x86_64``, ``aarch64``) and glibc
    (``"2.36"``), best first (PEP 600 and its legacy aliases), as ``packaging.tags`` lists them on the node.
    An unknown glibc is taken as 2.17, the lowest that current wheels are built for."""
    major, minor = (int(x) for x in (glibc or "2.17").split(".")[:2])
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags: list[str] = []
    for m in range(minor, 4, -1):
        tags.append(f"manylinux_{major}_{m}_{machine}")
        if m in legacy:
            tags.append(f"{legacy[m]}_{machine}")
    return (*tags, f"linux_{machine}")


# What a Linux x86_64 node with glibc >= 2.28 installs: pip takes a wheel of any of these tags.
LINUX_X86_64 = linux_platforms("x86_64", "2.28")


def _target_args(stack: Stack, platforms: tuple[str, ...]) -> list[str]:
    """pip's options that make it choose files for the nodes (the lock's Python, CPython, their platform),
    never for the interpreter pip runs under: the controller may be a laptop of another OS or Python."""
    out = ["--python-version", stack.python, "--implementation", "cp", "--abi", f"cp{stack.python.replace('.', '')}"]
    for p in platforms:
        out += ["--platform", p]
    return out


def _wheel_pins(stack: Stack) -> list[str]:
    """Every pin but the sdists built on the node against its torch."""
    later = set(stack.build_with_torch)
    return [r for phase in stack.requirements() for r in phase if canonical_name(r.split("==")[0]) not in later]


def dry_run_argv(stack: Stack, python: str, report: str | os.PathLike, target: str | os.PathLike,
                 platforms: tuple[str, ...] = LINUX_X86_64) -> list[str]:
    """``pip install --dry-run`` of the lock's wheels (every pin but the sdists built against torch) for the
    nodes' platform and the lock's Python, resolved by pip exactly as a node's install would (``--no-deps``:
    the lock is the closure), without downloading a single wheel (PEP 658 metadata)."""
    argv = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", *_target_args(stack, platforms),
            "--target", str(target), "--report", str(report)]
    return argv + list(stack.pip.args()) + _wheel_pins(stack)


def download_argvs(stack: Stack, python: str, dest: str | os.PathLike, platforms: tuple[str, ...],
                   pip_args: list[str] | None = None, sdist_only: tuple[str, ...] = ()) -> list[list[str]]:
    """The ``pip download`` commands that fill an offline wheelhouse for nodes of one platform: the lock's
    wheels for the nodes' Python and platform (binary only: a wrong-platform pick fails here, on the
    controller, not on a node without an index), then the sdists the nodes build against their torch
    (``build_with_torch``) and those ``sdist_only`` pins that publish no wheel at all. ``--no-deps``: the
    lock is the whole closure."""
    base = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "-d", str(dest),
            *(stack.pip.args() if pip_args is None else pip_args)]
    source = set(stack.build_with_torch) | {canonical_name(n) for n in sdist_only}
    pins = [r for phase in stack.requirements() for r in phase]
    wheels = [r for r in pins if canonical_name(r.split("==")[0]) not in source]
    sdists = [r for r in pins if canonical_name(r.split("==")[0]) in source]
    out = []
    if wheels:
        out.append([*base, "--only-binary=:all:", *_target_args(stack, platforms), *wheels])
    if sdists:
        out.append([*base, "--no-binary=:all:", *sdists])
    return out


def sdist_problems(stack: Stack, sources: list[str] | None = None, timeout: float = 20.0) -> list[str]:
    """The pins built on the node against its torch (``build_with_torch``) that have no sdist on the sources."""
    if sources is None:
        sources = [stack.pip.index_url or DEFAULT_INDEX, *stack.pip.extra_index_urls, *stack.pip.find_links]
    out = []
    for name in stack.build_with_torch:
        pin = stack.packages.get(name)
        if pin is None or name in stack.system_provided:
            continue
        files = [fn for src in sources for fn in _listing(src, name, timeout)]
        if not any(fn.endswith((".tar.gz", ".zip")) and _file_version(name, fn) == pin for fn in files):
            out.append(f"{name}=={pin} (no sdist to build against the node's torch)")
    return out


def sources_of(stack: Stack) -> list[str]:
    """Where the lock's files come from: its index (PyPI unless set), extra indexes and find-links."""
    return [stack.pip.index_url or DEFAULT_INDEX, *stack.pip.extra_index_urls, *stack.pip.find_links]


def sdist_only(pins: list[str], sources: list[str], timeout: float = 20.0) -> list[str]:
    """Of ``name==version`` pins, those whose version the sources publish as an sdist and as no wheel at all
    (a pure-Python project that never uploaded wheels): the wheelhouse carries their sdist."""
    out = []
    for pin in pins:
        name, version = canonical_name(pin.split("==")[0]), pin.split("==", 1)[1]
        files = [fn for src in sources for fn in _listing(src, name, timeout) if _file_version(name, fn) == version]
        if files and not any(fn.endswith(".whl") for fn in files):
            out.append(name)
    return out

