# -*- coding: utf-8 -*-
"""Controller: build the offline wheelhouse for a lock once; nodes then install with --no-index from it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401  (makes llamafleet importable)

from llamafleet.lock import resolve_dict
from llamafleet.rules import MARKER


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        dest = Path(args["state_dir"]) / "wheelhouse" / stack.venv_name
        result["path"] = str(dest)
        if (dest / MARKER).is_file():
            result.update(changed=False, bytes=_size(dest))
            return result
        dest.mkdir(parents=True, exist_ok=True)
        pip_args = list(args.get("pip_args") or stack.pip.args())
        reqs = [r for phase in stack.requirements() for r in phase]
        # Wheels for the nodes' platform; sdists (deepspeed) travel as sdists and are built on the node
        # against its torch. --no-deps: the lock is the whole closure already.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "-d", str(dest), *pip_args, *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            missing = re.findall(r"No matching distribution found for (\S+)", text)
            if missing:
                msg = (f"the stack lock {stack.lock_file} pins versions that do not exist on the package index: "
                       f"{', '.join(missing)}. Fix these pins in the lock; nothing was installed.")
            else:
                tail = "\n".join(text.strip().splitlines()[-12:])
                msg = f"building the offline wheelhouse for {stack.lock_file} failed; nothing was installed:\n{tail}"
            shutil.rmtree(dest, ignore_errors=True)
            result.update(failed=True, msg=msg)
            return result
        (dest / MARKER).write_text(stack.hash)
        result.update(changed=True, bytes=_size(dest))
        return result


def _size(dest):
    """The wheelhouse's bytes: what decides whether it goes node to node (stack_fanout)."""
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
