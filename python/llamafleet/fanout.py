"""The controller's side of a node-to-node fan-out (``module_utils/fanout.py`` has the protocol and the relay).

A transfer: the controller's manifest of a directory (size and SHA-256 of every file, hashes cached by size and
mtime), a fresh id and secret (a 0600 file in the state dir, deleted when the transfer ends), then the stream of
the files some node misses into the first node that misses anything, over SSH (the inventory's key and
known_hosts, host keys checked as Ansible checks them); the nodes pass it on to each other over the training
network. Only nodes that miss something are in the chain, in the inventory's order.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LlamafleetError
from .rules import sha256_file



def _sha256(path: Path) -> str:
    return sha256_file(path)


def manifest(src: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Every regular file under ``src`` (a relay's part files excluded): relative path -> size and sha256."""
    root = Path(src)
    if not root.is_dir():
        raise LlamafleetError(f"{root}: not a directory; nothing to fan out")
    cache: dict[str, list] = {}
    if cache_file and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    out, fresh = {}, {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if path.name.endswith(".fanout-part"):
            continue
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        hit = cache.get(rel)
        digest = hit[2] if hit and hit[:2] == key else _sha256(path)
        fresh[rel] = key + [digest]
        out[rel] = {"size": st.st_size, "sha256": digest}
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps(fresh))
    return out


def sized(src: str | os.PathLike, hashes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """A manifest from hashes computed already (relative path -> sha256, e.g. a training plan's): sizes added."""
    root = Path(src)
    try:
        return {rel: {"size": (root / rel).stat().st_size, "sha256": digest} for rel, digest in sorted(hashes.items())}
    except OSError as exc:
        raise LlamafleetError(f"{exc.filename}: listed in the manifest but not readable ({exc.strerror})") from None


def new_transfer(state_dir: str | os.PathLike) -> tuple[str, str]:
    """A fresh transfer id and its secret, in a file only the controller's user can read."""
    tid = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    path = Path(state_dir) / "fanout" / f"{tid}.key"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(secrets.token_hex(32))
    return tid, str(path)


def receivers(hostvars: Mapping[str, Any], hosts: Sequence[str], register: str) -> list[dict[str, Any]]:
    """The nodes of ``hosts`` (in order) whose receive (registered as ``register``) started a relay."""
    out = []
    for host in hosts:
        res = (hostvars.get(host) or {}).get(register) or {}
        if res.get("port"):
            out.append({"name": host, "addr": res["addr"], "port": res["port"], "missing": res["missing"],
                        "partial": res.get("partial") or {}, "relay": res["relay"], "python": res["python"]})
    return out


def route(hostvars: Mapping[str, Any], manifest: Mapping[str, Mapping[str, Any]], hosts: Sequence[str],
          register: str) -> dict[str, Any]:
    """What a sending node streams (the fanout module's ``route``): the chain and the files some node misses."""
    chain, entries = chain_and_files(receivers(hostvars, hosts, register), manifest)
    return {"chain": chain, "entries": entries}


def chain_and_files(nodes: Sequence[Mapping[str, Any]], files: Mapping[str, Mapping[str, Any]]):
    """The chain (nodes that miss something, in order) and the stream's file entries (what some node misses,
    each with the nodes that want it, and the offset it resumes from: the fewest bytes any of them holds of it in a
    part file a broken-off transfer left, so every one of them can append)."""
    chain = [n for n in nodes if n.get("missing")]
    wanted: dict[str, list[str]] = {}
    offset: dict[str, int] = {}
    for n in chain:
        for rel in n["missing"]:
            wanted.setdefault(rel, []).append(n["name"])
            held = min(int((n.get("partial") or {}).get(rel) or 0), int(files[rel]["size"]))
            offset[rel] = min(offset.get(rel, held), held)
    entries = [dict(files[rel], path=rel, to=wanted[rel], **({"offset": offset[rel]} if offset[rel] else {}))
               for rel in sorted(wanted)]
    return [{"name": n["name"], "addr": n["addr"], "port": n["port"]} for n in chain], entries


def send(ssh_argv: Sequence[str], relay_py: str, python: str, chain: Sequence[Mapping[str, Any]],
         entries: Sequence[Mapping[str, Any]], src: str | os.PathLike, secret_file: str | os.PathLike,
         protocol: Any) -> dict[str, Any]:
    """Stream ``entries`` into ``chain[0]`` over SSH (its relay through ``relay_py pipe``); returns bytes,
    seconds and every reached node's outcome (``acks``). ``protocol``: module_utils/fanout.py (the same code the nodes run)."""
    secret = Path(secret_file).read_text().strip().encode()
    first = chain[0]
    cmd = [*ssh_argv, shlex.join([python, relay_py, "pipe", str(first["addr"]), str(int(first["port"]))])]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    conn = protocol.Conn(rfile=proc.stdout, wfile=proc.stdin)
    try:
        sent, acks = protocol.send(conn, secret, list(chain[1:]), list(entries), str(src))
    except (OSError, EOFError, protocol.FanoutError) as exc:
        proc.kill()
        err = proc.communicate()[1].decode(errors="replace").strip()[-500:]
        raise LlamafleetError(f"{first['name']}: the fan-out stream from the controller broke off ({exc})"
                              + (f": {err}" if err else "")) from None
    finally:
        conn.close()
    proc.wait(timeout=60)
    return {"bytes": sent, "seconds": round(time.monotonic() - t0, 3), "first": first["name"],
            "chain": [n["name"] for n in chain], "acks": acks,
            "resumed_bytes": sum(int(e.get("offset") or 0) for e in entries)}


def push(inventory: str | os.PathLike, src: str | os.PathLike, dest: str, *, nodes: Sequence[str] | None = None,
         timeout_s: int | None = None, extravars: Mapping[str, Any] | None = None, on_event=None):
    """Fan ``src`` (a controller directory) out to ``dest`` on ``nodes`` (default: every node), node to node
    (``playbooks/fanout.yml``); returns the playbook's result (``.ok``, ``.results``, ``.failure_messages()``)."""
    from .runner import run_playbook

    ev = dict(extravars or {})
    ev.update(fanout_src=str(Path(src).resolve()), fanout_dest=dest)
    if nodes:
        ev["fanout_hosts"] = list(nodes)
    if timeout_s:
        ev["fanout_timeout_s"] = timeout_s
    return run_playbook("fanout.yml", inventory, verb="fanout", extravars=ev, on_event=on_event)
