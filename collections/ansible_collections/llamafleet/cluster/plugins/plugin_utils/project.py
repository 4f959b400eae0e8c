# -*- coding: utf-8 -*-
"""Controller-side bridge to the llamafleet Python package, which holds the logic these plugins run."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import llamafleet  # noqa: F401  (installed in the controller's environment)
except ImportError:  # ansible-playbook run from a checkout without llamafleet installed
    # collections/ansible_collections/llamafleet/cluster/plugins/plugin_utils/project.py -> <project>/python
    sys.path.insert(0, str(Path(__file__).resolve().parents[6] / "python"))

from llamafleet.paths import PROJECT_DIR, state_dir  # noqa: E402,F401


def host_results(task_vars: dict, hosts: list[str], var: str) -> dict[str, dict]:
    """A registered variable of each host, as plain data (hosts without it are left out)."""
    hostvars = task_vars["hostvars"]
    out = {}
    for h in hosts:
        hv = hostvars[h]
        if var in hv:
            out[h] = hv[var]
    return out
