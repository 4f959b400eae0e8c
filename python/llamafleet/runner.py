"""The one place that runs playbooks: ansible-runner, a fresh private data dir per run, events -> per-host results.

Extra vars (``train_env`` may hold secrets) reach ansible-playbook as ``-e @<private data dir>/env/extravars``,
a file of mode 0600 in a directory of mode 0700, deleted right after the run: never on a command line,
which ``ps`` shows to every user. Runner's other env files are suppressed, the private data dir (events,
artifacts) is deleted after the run (``LLAMAFLEET_KEEP_RUNNER_DIRS=1`` keeps it, events included, for
debugging; never the extra vars), and what is kept is the plain-text log of the run under ``<state_dir>/logs``.

ansible-runner is always given a cancel callback (``cancel``, else never), so it never installs its own
SIGINT/SIGTERM handlers: the caller owns its signals. A set ``cancel`` ends the playbook within a second.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import InventoryError, LlamafleetError
from .paths import PROJECT_DIR, state_dir

# Only these environment variables reach ansible-playbook (plus ANSIBLE_*): a run is reproducible
# and no unrelated secret of the caller's environment leaks into it.
_ENV_ALLOW = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "TMPDIR", "SSH_AUTH_SOCK", "PATH",
              "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
              "PIP_CONFIG_FILE", "PIP_CERT", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT", "REQUESTS_CA_BUNDLE")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
KEEP_DIRS_VAR = "LLAMAFLEET_KEEP_RUNNER_DIRS"


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """One thing that happened on one host, for progress views."""

    host: str
    task: str
    status: str  # started | ok | changed | failed | unreachable | skipped
    message: str = ""


@dataclasses.dataclass
class HostOutcome:
    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PlaybookResult:
    rc: int
    status: str
    hosts: dict[str, HostOutcome]
    results: dict[str, dict[str, Any]]  # task action -> host -> result (llamafleet.cluster.* actions only)
    log_path: Path
    stdout_tail: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not any(h.failed or h.unreachable for h in self.hosts.values())

    def failure_messages(self) -> list[str]:
        msgs: list[str] = []
        for h in self.hosts.values():
            msgs += h.failures
        if not msgs and self.rc != 0:
            # Failed before any task: Ansible's own error (inventory parse, syntax, missing file).
            msgs.append(_ansible_error(self.stdout_tail) or f"ansible-playbook exited {self.rc}")
        return msgs


def _ansible_error(stdout: str) -> str:
    """The one useful sentence of an error Ansible raised before running any task."""
    bad_inv = re.search(r"Completely failed to parse inventory source (\S+)", stdout)
    if bad_inv:
        reason = re.search(r"Failed to parse inventory with '(?:auto|yaml)' plugin: (.+)", stdout)
        origin = re.search(r"Origin: (/\S+:\d+:\d+)", stdout)
        text = f"inventory {bad_inv.group(1)} is not valid"
        if reason:
            text += f": {reason.group(1).strip()}"
        if origin:
            text += f" (at {origin.group(1)})"
        return text + ". Fix the file (inventory/sample/hosts.yml shows the expected shape)."
    errors = [line for line in stdout.splitlines() if "ERROR" in line]
    return "\n".join(errors[-8:]) or stdout[-2000:].strip()


def _environment(sdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_ALLOW or k.startswith("ANSIBLE_")}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["ANSIBLE_CONFIG"] = str(PROJECT_DIR / "ansible.cfg")
    # SSH control sockets: in the cluster's state unless its path is too deep for a Unix socket's 108 bytes
    # (then Ansible's own ~/.ansible/cp)
    if len(str(sdir / "cp")) <= 80:
        env.setdefault("ANSIBLE_SSH_CONTROL_PATH_DIR", str(sdir / "cp"))
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


def check_inventory_path(inventory: str | os.PathLike) -> Path:
    path = Path(inventory).expanduser()
    if not path.exists():
        raise InventoryError(f"inventory {path} does not exist: pass the directory or file that lists your nodes "
                             "(e.g. -i inventory/local, or a copy of inventory/sample)")
    return path.resolve()


def _message(res: Mapping[str, Any]) -> str:
    msg = res.get("msg") or ""
    if res.get("stderr") and (not msg or msg == "non-zero return code"):
        # a command's own words say more than Ansible's summary of them
        msg = " / ".join(str(res["stderr"]).strip().splitlines()[-3:])
    if isinstance(msg, list):
        msg = "\n".join(str(m) for m in msg)
    return str(msg).strip()


def _configured_forks() -> int:
    """ANSIBLE_FORKS, else the forks of the project's ansible.cfg (what the playbooks run with)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(PROJECT_DIR / "ansible.cfg")
    return int(os.environ.get("ANSIBLE_FORKS") or cfg.get("defaults", "forks", fallback="5"))


# Ansible runs min(forks, hosts of the play) tasks at once, so forks at least this makes every node's start of a
# cluster of up to this many nodes run at once, as the rendezvous needs, without reading the inventory here
# (parsing it costs ~0.3 s in a fresh process; the plan action refuses a larger cluster, naming ANSIBLE_FORKS).
ALL_AT_ONCE_FORKS = 4096


class _Events:
    """ansible-runner's events, folded into per-host outcomes and the results of llamafleet's own actions."""

    def __init__(self, on_event: Callable[[TaskEvent], None] | None, keep: bool):
        self.hosts: dict[str, HostOutcome] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.on_event = on_event
        self.keep = keep

    def _emit(self, ev: TaskEvent) -> None:
        if self.on_event:
            self.on_event(ev)

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host") or ""
        res = data.get("res") or {}
        action = data.get("task_action") or ""
        if kind == "runner_on_start" and host:
            self._emit(TaskEvent(host, data.get("task") or "", "started"))
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable", "runner_on_skipped") and host:
            self._outcome(kind, host, data, res, action)
        elif kind == "runner_item_on_ok" and action.startswith("llamafleet.cluster.") and res.get("item"):
            self.results.setdefault(action.rsplit(".", 1)[-1], {})[str(res["item"])] = res
        return self.keep  # do not keep the event on disk beyond the run, unless asked to (debugging)

    def _outcome(self, kind: str, host: str, data: dict[str, Any], res: dict[str, Any], action: str) -> None:
        o = self.hosts.setdefault(host, HostOutcome(host))
        if kind == "runner_on_ok":
            status = "changed" if res.get("changed") else "ok"
            o.ok += 1
            o.changed += bool(res.get("changed"))
        elif kind == "runner_on_skipped":
            status = "skipped"
            o.skipped += 1
        elif kind == "runner_on_unreachable":
            status = "unreachable"
            o.unreachable += 1
            o.failures.append(f"{host}: unreachable: {_message(res)}. Check that the node is up, its ssh address "
                              "(ansible_host) and that its host key is in your known_hosts")
        elif data.get("ignore_errors"):
            status = "ok"
        else:
            status = "failed"
            o.failed += 1
            msg = _message(res)
            # A run_once action judges all nodes: its message already names each host.
            o.failures.append(msg if action.startswith("llamafleet.cluster.") and not action.endswith(".node")
                              else f"{host}: {data.get('task') or ''}: {msg}")
        # A loop's closing event carries only its items, which arrived one by one (runner_item_on_ok); a result
        # marked bookkeeping (e.g. a secret removed) does not replace the action's result that matters.
        if action.startswith("llamafleet.cluster.") and kind != "runner_on_skipped" and "results" not in res \
                and not res.get("bookkeeping"):
            self.results.setdefault(action.rsplit(".", 1)[-1], {})[host] = res
        self._emit(TaskEvent(host, data.get("task") or "", status,
                             _message(res) if status in ("failed", "unreachable") else ""))


def _write_extravars(pdd: Path, extra: Mapping[str, Any]) -> Path:
    """Where ansible-runner looks (it passes -e @<this file>): mode 0600 in a 0700 directory."""
    path = pdd / "env" / "extravars"
    path.parent.mkdir(mode=0o700)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        json.dump(extra, fh)
    return path


def run_playbook(
    playbook: str,
    inventory: str | os.PathLike,
    *,
    extravars: Mapping[str, Any] | None = None,
    limit: str | None = None,
    on_event: Callable[[TaskEvent], None] | None = None,
    cancel: threading.Event | None = None,
    verb: str | None = None,
) -> PlaybookResult:
    """Run ``playbooks/<playbook>`` against the inventory; never raises for a failed play."""
    import ansible_runner  # imported here: `llamafleet --help` should not pay for it

    inv = check_inventory_path(inventory)
    extra = dict(extravars or {})
    sdir = state_dir(extra.get("llamafleet_state_dir"), inv)
    extra["llamafleet_state_dir"] = str(sdir)
    (sdir / "logs").mkdir(exist_ok=True)
    log_path = sdir / "logs" / f"{verb or Path(playbook).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}.log"
    pdd = Path(tempfile.mkdtemp(prefix="runner-", dir=sdir))
    events = _Events(on_event, keep=bool(os.environ.get(KEEP_DIRS_VAR)))
    extravars_file = pdd / "env" / "extravars"
    try:
        _write_extravars(pdd, extra)
        envvars = _environment(sdir)
        if Path(playbook).name == "train.yml":
            # every node's start task must run at once (the master's rendezvous check waits for all workers)
            envvars["ANSIBLE_FORKS"] = str(max(_configured_forks(), ALL_AT_ONCE_FORKS))
        r = ansible_runner.run(
            private_data_dir=str(pdd), project_dir=str(PROJECT_DIR), playbook=str(PROJECT_DIR / "playbooks" / playbook),
            inventory=str(inv), limit=limit, envvars=envvars, suppress_env_files=True, quiet=True, json_mode=False,
            event_handler=events,
            # never None: runner would install SIGINT/SIGTERM handlers of its own and keep them
            cancel_callback=(lambda: cancel.is_set()) if cancel else (lambda: False),
            # how often runner asks the callback (default 5 s)
            settings={"suppress_ansible_output": True, "pexpect_timeout": 0.5},
        )
        stdout = ""
        try:
            stdout = _ANSI.sub("", r.stdout.read())
        except Exception:  # noqa: BLE001 - a missing stdout must not hide the result
            pass
        log_path.write_text(stdout)
        rc = r.rc if isinstance(r.rc, int) else 1
        if rc == 127 or (not events.hosts and r.status == "failed" and "ansible-playbook" in stdout
                         and "not found" in stdout):
            raise LlamafleetError(f"ansible-playbook was not found next to {sys.executable}: install llamafleet "
                                  "with pip in this environment (pip install llamafleet, or pip install -e . in a checkout)")
        return PlaybookResult(rc=rc, status=r.status, hosts=events.hosts, results=events.results, log_path=log_path,
                              stdout_tail=stdout[-6000:])
    finally:
        extravars_file.unlink(missing_ok=True)
        if not events.keep:
            shutil.rmtree(pdd, ignore_errors=True)
