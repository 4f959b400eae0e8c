"""The library: ``provision`` and ``check`` return dataclasses; the CLI is a thin layer over these.

    from llamafleet import provision, check
    result = provision("inventory/local")
    print(result.format())          # or result.to_json()
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .parity import ParityReport
from .runner import PlaybookResult, TaskEvent, run_playbook


@dataclasses.dataclass(frozen=True)
class NodeResult:
    name: str
    ok: bool
    changed: int
    action: str  # what happened to its stack venv: none | built | repaired | unreachable | failed | inspected
    venv: str | None
    failures: tuple[str, ...]
    repaired: tuple[str, ...] = ()  # what a repair put right: drifted pins, removed packages


@dataclasses.dataclass(frozen=True)
class StackResult:
    """What ``provision`` or ``check`` found: per node, the parity report, and the errors in words."""

    verb: str
    ok: bool
    rc: int
    inventory: str
    nodes: tuple[NodeResult, ...]
    parity: ParityReport | None
    errors: tuple[str, ...]
    log_path: str
    report_path: str | None

    @property
    def changed(self) -> int:
        return sum(n.changed for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parity"] = self.parity.to_dict() if self.parity else None
        d["changed"] = self.changed
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format(self) -> str:
        lines = []
        if self.ok:
            lines.append(f"{self.verb}: OK on {len(self.nodes)} node(s), changed={self.changed}")
        else:
            lines.append(f"{self.verb}: FAILED")
            lines += [f"  {e}".replace("\n", "\n  ") for e in self.errors]
        for n in self.nodes:
            lines.append(f"  {n.name}: {n.action}" + (f" ({n.venv})" if n.venv else "")
                         + (f": {', '.join(n.repaired)}" if n.repaired else ""))
        if self.parity is not None and self.ok:
            lines.append(self.parity.format())
        if self.report_path:
            lines.append(f"parity report: {self.report_path}")
        lines.append(f"log: {self.log_path}")
        return "\n".join(lines)


def _extravars(lock_file: str | os.PathLike | None, flavor: str | None, offline: bool | None,
               extra: Mapping[str, Any] | None, serving: str | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = dict(extra or {})
    if serving:
        ev["llamafleet_serving"] = serving
    if lock_file:
        ev["llamafleet_lock_file"] = str(os.path.abspath(lock_file))
    if flavor:
        ev["llamafleet_flavor"] = flavor
    if offline is not None:
        ev["stack_offline"] = offline
    return ev


def _summarize(verb: str, inventory: str, run: PlaybookResult, limit: str | None = None) -> StackResult:
    parity = None
    report_path = None
    for res in (run.results.get("parity") or {}).values():
        if "report" in res:
            parity = ParityReport.from_dict(res["report"])
            report_path = res.get("report_path")
    installs = run.results.get("node") or {}
    nodes = []
    validated = next(iter((run.results.get("validate") or {}).values()), {})
    order = [n["name"] for n in (validated.get("cluster") or {}).get("nodes", [])] or sorted(run.hosts)
    for name in order:
        o = run.hosts.get(name)
        res = installs.get(name) or {}
        if o is None:
            action = "not in --limit" if limit else "not reached"
        elif o.unreachable:
            action = "unreachable"
        elif o.failed:
            action = "failed"
        else:
            action = res.get("action") or ("unchanged" if verb == "provision" else "inspected")
        nodes.append(NodeResult(name=name, ok=bool(o) and not (o.failed or o.unreachable),
                                changed=o.changed if o else 0, action=action,
                                venv=(res.get("stack") or {}).get("path"),
                                failures=tuple(o.failures) if o else (),
                                repaired=tuple((res.get("repaired") or {}).get("drift", []))
                                + tuple(f"removed {x}" for x in (res.get("repaired") or {}).get("extras", []))))
    errors = tuple(dict.fromkeys(run.failure_messages())) if not run.ok else ()
    return StackResult(verb=verb, ok=run.ok and (parity is None or parity.ok), rc=run.rc, inventory=inventory,
                       nodes=tuple(nodes), parity=parity, errors=errors, log_path=str(run.log_path),
                       report_path=report_path)


def provision(inventory: str | os.PathLike, *, limit: str | None = None, lock_file: str | os.PathLike | None = None,
              flavor: str | None = None, offline: bool | None = None, force: bool = False,
              serving: str | None = None, extravars: Mapping[str, Any] | None = None,
              on_event: Callable[[TaskEvent], None] | None = None, cancel: threading.Event | None = None) -> StackResult:
    """Make every node's training stack match the lock, then prove parity (``playbooks/provision.yml``).
    A venv that a running run's ranks use is not changed (the node's error names the run) unless ``force``.
    ``serving="vllm"``: that serving stack of the lock instead, a venv of its own (on the ``limit`` nodes)."""
    extra = _extravars(lock_file, flavor, offline, extravars, serving)
    if force:
        extra["stack_force"] = True
    run = run_playbook("provision.yml", inventory, limit=limit, on_event=on_event, cancel=cancel, verb="provision",
                       extravars=extra)
    return _summarize("provision", str(inventory), run, limit)


def check(inventory: str | os.PathLike, *, limit: str | None = None, lock_file: str | os.PathLike | None = None,
          flavor: str | None = None, serving: str | None = None, extravars: Mapping[str, Any] | None = None,
          on_event: Callable[[TaskEvent], None] | None = None) -> StackResult:
    """Probe every node and compare; changes nothing on any node (``playbooks/check.yml``)."""
    run = run_playbook("check.yml", inventory, limit=limit, on_event=on_event, verb="check",
                       extravars=_extravars(lock_file, flavor, None, extravars, serving))
    return _summarize("check", str(inventory), run, limit)
