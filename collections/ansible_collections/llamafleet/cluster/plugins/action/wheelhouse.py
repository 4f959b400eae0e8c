# -*- coding: utf-8 -*-
"""Controller: build the offline wheelhouse for a lock once; nodes then install with --no-index from it.

The files are chosen for the nodes, never for the controller: the lock's Python and each node platform
(machine and lowest glibc of the installing nodes, from their inspection), so a macOS laptop or a
controller on another Python builds a wheelhouse Linux nodes install from. One wheelhouse serves nodes of
several machines (x86_64 and aarch64): each platform's wheels are added beside the others, and a node's
pip takes its own.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401  (makes llamafleet importable)

from llamafleet import pins
from llamafleet.lock import resolve_dict
from llamafleet.parity import version_tuple
from llamafleet.rules import MARKER

_MISSING = re.compile(r"No matching distribution found for (\S+)")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        dest = Path(args["state_dir"]) / "wheelhouse" / stack.venv_name
        result["path"] = str(dest)
        wanted = args.get("platforms") or _controller_platform()
        covered = _covered(dest, stack.hash)
        todo = {m: pf for m, pf in wanted.items()
                if m not in covered or version_tuple(covered[m]) > version_tuple(pf.get("glibc") or "2.17")}
        if not todo:
            result.update(changed=False, bytes=_size(dest), platforms=covered)
            return result
        fresh = not covered
        dest.mkdir(parents=True, exist_ok=True)
        pip_args = list(args.get("pip_args") or stack.pip.args())
        for machine, pf in sorted(todo.items()):
            msg = _download(stack, dest, pip_args, machine, pf)
            if msg:
                if fresh:
                    shutil.rmtree(dest, ignore_errors=True)
                result.update(failed=True, msg=msg)
                return result
            covered[machine] = pf.get("glibc") or "2.17"
        (dest / MARKER).write_text(json.dumps({"hash": stack.hash, "platforms": covered}, sort_keys=True))
        result.update(changed=True, bytes=_size(dest), platforms=covered)
        return result


def _download(stack, dest, pip_args, machine, pf):
    """Fill ``dest`` for one node platform; an error message (nothing installed anywhere yet) or None."""
    tags = pins.linux_platforms(machine, pf.get("glibc"))
    where = f"CPython {stack.python} on Linux {machine} (glibc {pf.get('glibc') or 'unknown'}: {', '.join(pf.get('hosts') or [])})"
    sdists: list[str] = []
    for _ in range(2):  # a second pass only for pins that publish no wheel at all (their sdist is carried)
        failed = None
        for argv in pins.download_argvs(stack, sys.executable, dest, tags, pip_args, tuple(sdists)):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                failed = proc.stdout + proc.stderr
                break
        if failed is None:
            return None
        missing = _MISSING.findall(failed)
        new = [n for n in pins.sdist_only(missing, pins.sources_of(stack)) if n not in sdists] if missing else []
        if not new:
            break
        sdists += new
    if missing:
        return (f"the stack lock {stack.lock_file} pins files that exist for none of the nodes: {', '.join(missing)} "
                f"has no wheel for {where} on the package index. Pin a version that publishes one, or fix the index "
                "settings (stack_pip_index_url); nothing was installed.")
    tail = "\n".join(failed.strip().splitlines()[-12:])
    return f"building the offline wheelhouse for {stack.lock_file} ({where}) failed; nothing was installed:\n{tail}"


def _covered(dest, lock_hash):
    """Platforms (machine -> lowest glibc) a complete wheelhouse of this lock already serves."""
    try:
        data = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return dict(data.get("platforms") or {}) if isinstance(data, dict) and data.get("hash") == lock_hash else {}


def _controller_platform():
    """Without node facts (a direct call): this controller's own platform, if it is a Linux one."""
    libc, ver = platform.libc_ver()
    return {os.uname().machine: {"glibc": ver if libc == "glibc" else None, "hosts": ["the controller"]}}


def _size(dest):
    """The wheelhouse's bytes: what decides whether it goes node to node (stack_fanout)."""
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
