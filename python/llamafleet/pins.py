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
