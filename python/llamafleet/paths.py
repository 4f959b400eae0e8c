"""Where llamafleet's own files are: the project (playbooks, roles, inventories) and the controller state."""

from __future__ import annotations

import os
from pathlib import Path

# python/llamafleet/paths.py -> the project root that holds ansible.cfg, playbooks/, roles/.
PROJECT_DIR = Path(os.environ.get("LLAMAFLEET_PROJECT_DIR") or Path(__file__).resolve().parents[2])


def state_dir(value: str | os.PathLike | None = None) -> Path:
    """The controller's state directory: reports, logs, caches, wheelhouses, SSH control sockets.
    ``value`` (the llamafleet_state_dir variable) wins, then $LLAMAFLEET_STATE_DIR, then <project>/.llamafleet."""
    path = Path(value or os.environ.get("LLAMAFLEET_STATE_DIR") or PROJECT_DIR / ".llamafleet")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
