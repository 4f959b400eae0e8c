"""Names that become directories: run ids and job names.

A run id names ``<root>/runs/<run_id>`` on every node and ``<state_dir>/runs/<run_id>`` on the
controller; a job name names ``<root>/inputs/<job>`` and ``<state_dir>/stage/<job>``, which a plan
replaces. So a name must stay one plain directory entry: no ``/``, no ``..``, not hidden, not an
option. Python (every verb) and Ansible (the ``llamafleet.cluster.name_problems`` filter, asserted
by the train role before any node is touched) check them with this one function.
"""

from __future__ import annotations

import re

from .errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_JOB_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
FIX = "use letters, digits, '.', '_' and '-', starting with a letter or digit, without '/' or '..'"


def name_problem(value: object, what: str) -> str | None:
    """Why ``value`` cannot be a run id or job name (``what`` names the setting), or None when it can."""
    text = "" if value is None else str(value)
    if _NAME.fullmatch(text) and ".." not in text:
        return None
    if not text:
        why = "is empty"
    elif "/" in text:
        why = "contains '/'"
    elif ".." in text:
        why = "contains '..'"
    elif text[0] in ".-":
        why = f"starts with {text[0]!r}"
    else:
        why = "contains characters other than letters, digits, '.', '_' and '-'"
    return (f"{what} {text!r} {why}; it names a directory on every node and on the controller, so {FIX} "
            "(e.g. sft-run-1)")


def check_name(value: object, what: str) -> str:
    """``value`` when it is a valid run id or job name; else ConfigError with the fix."""
    problem = name_problem(value, what)
    if problem:
        raise ConfigError(problem)
    return str(value)


def check_run_id(run_id: str | None, what: str = "run id") -> str | None:
    """A given run id, checked; None or empty (= the nodes' active run, or a new one) passes as None."""
    return check_name(run_id, what) if run_id else None


def normalize_job(name: str) -> str:
    """A job name from a file stem or a user's train_job: runs of other characters become '-'."""
    return _JOB_CHARS.sub("-", name).strip("-")
