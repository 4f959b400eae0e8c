# -*- coding: utf-8 -*-
"""Controller-side bridge to the llamafleet Python package, which holds the logic these plugins run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# collections/ansible_collections/llamafleet/cluster/plugins/plugin_utils/project.py -> project root
PROJECT_DIR = Path(__file__).resolve().parents[6]

try:
    import llamafleet  # noqa: F401  (installed in the controller's environment)
except ImportError:  # ansible-playbook run from a checkout without `pip install -e python`
    sys.path.insert(0, str(PROJECT_DIR / "python"))


def state_dir(value: str | None) -> Path:
    """The controller's llamafleet state directory: reports, caches, wheelhouses, SSH sockets."""
    path = Path(value or os.environ.get("LLAMAFLEET_STATE_DIR") or PROJECT_DIR / ".llamafleet")
    path.mkdir(parents=True, exist_ok=True)
    return path


def host_results(task_vars: dict, hosts: list[str], var: str) -> dict[str, dict]:
    """A registered variable of each host, as plain data (hosts without it are left out)."""
    hostvars = task_vars["hostvars"]
    out = {}
    for h in hosts:
        hv = hostvars[h]
        if var in hv:
            out[h] = hv[var]
    return out
