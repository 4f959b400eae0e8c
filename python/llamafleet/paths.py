"""Where llamafleet's own files are (playbooks, roles, collection, templates) and where its state goes.

Resources: an installed wheel carries them in ``llamafleet/share`` (copied there at build time); a checkout
(editable install, or ``ansible-playbook`` run in it) reads them in place. ``$LLAMAFLEET_PROJECT_DIR`` points
at another copy.

State (reports, logs, caches, wheelhouses, run records, SSH control sockets) belongs to a cluster: the first of
``--state-dir`` (the ``llamafleet_state_dir`` variable), ``$LLAMAFLEET_STATE_DIR``, then ``.llamafleet`` beside
the inventory (in the inventory's directory, or the directory that holds an inventory file). Two clusters whose
inventories sit in two directories never share state.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "LLAMAFLEET_STATE_DIR"
STATE_NAME = ".llamafleet"
_PACKAGE = Path(__file__).resolve().parent


def _resources() -> Path:
    if os.environ.get("LLAMAFLEET_PROJECT_DIR"):
        return Path(os.environ["LLAMAFLEET_PROJECT_DIR"]).resolve()
    share = _PACKAGE / "share"
    if (share / "ansible.cfg").is_file():
        return share
    return _PACKAGE.parents[1]  # python/llamafleet/paths.py -> the checkout's root


# The directory that holds ansible.cfg, playbooks/, roles/, collections/ and templates/.
PROJECT_DIR = _resources()


def inventory_home(inventory: str | os.PathLike) -> Path:
    """The directory an inventory lives in: itself when it is a directory, else the one that holds it (what
    Ansible calls ``inventory_dir`` for the hosts it defines)."""
    path = Path(inventory).expanduser()
    return (path if path.is_dir() else path.parent).resolve()


def state_dir(value: str | os.PathLike | None = None, inventory: str | os.PathLike | None = None) -> Path:
    """The controller's state directory for the cluster of ``inventory`` (see the module's docstring); created."""
    if value or os.environ.get(STATE_ENV):
        path = Path(value or os.environ[STATE_ENV]).expanduser()
    elif inventory:
        path = inventory_home(inventory) / STATE_NAME
    else:
        path = Path.cwd() / STATE_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
