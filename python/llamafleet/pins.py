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


# What a Linux x86_64 node with glibc >= 2.28 installs: pip takes a wheel of any of these tags.
LINUX_X86_64 = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64")


def dry_run_argv(stack: Stack, python: str, report: str | os.PathLike, target: str | os.PathLike,
                 platforms: tuple[str, ...] = LINUX_X86_64) -> list[str]:
    """``pip install --dry-run`` of the lock's wheels (every pin but the sdists built against torch) for the
    nodes' platform and the lock's Python, resolved by pip exactly as a node's install would (``--no-deps``:
    the lock is the closure), without downloading a single wheel (PEP 658 metadata)."""
    later = set(stack.build_with_torch)
    pins = [r for phase in stack.requirements() for r in phase if canonical_name(r.split("==")[0]) not in later]
    ver = stack.python.replace(".", "")
    argv = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--python-version", stack.python, "--implementation", "cp",
            "--abi", f"cp{ver}", "--target", str(target), "--report", str(report)]
    for p in platforms:
        argv += ["--platform", p]
    return argv + list(stack.pip.args()) + pins


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
