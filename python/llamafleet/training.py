"""Training runs from Python: ``train``, ``follow``, ``status``, ``stop``, ``collect``, ``logs``.

Each is one playbook run (``playbooks/<verb>.yml``) through the runner. What keeps the cluster safe is on
the nodes: every node's supervisor (module_utils/supervisor.py) stops every rank on every node when a rank
fails, a node's heartbeat stops, no first step comes in time or progress stalls, and writes why.
``follow`` looks at the nodes every few seconds with ``status``, shows progress and that reason, and ends
with ``collect``: every node's log and rank 0's outputs in ``<state_dir>/runs/<run_id>/`` on the
controller. A node that does not answer a look (an SSH hiccup, the controller's network) stops nothing.

The run belongs to the cluster, not to whoever follows it: a set ``cancel`` event ends following
within a second and leaves the run going (state ``detached``; ``follow`` again later), or, with
``stop_on_cancel``, stops every rank first (state ``stopped``). Every given run id is checked
(``names.check_run_id``) before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .names import check_name, check_run_id
from .paths import state_dir
from .runner import PlaybookResult, TaskEvent, run_playbook

FAILED_STATES = ("exited-error", "lost", "stopped", "unreachable", "absent")


@dataclasses.dataclass(frozen=True)
class NodeRun:
    name: str
    state: str  # running | exited | exited-error | stopped | lost | absent | unreachable
    rc: int | None
    pid: int | None
    log_tail: tuple[str, ...]
    # the node's supervisor: why the run ended there when it did not succeed, and who saw it first
    reason: str | None = None
    reason_by: str | None = None


@dataclasses.dataclass(frozen=True)
class RunStatus:
    run_id: str | None
    nodes: tuple[NodeRun, ...]
    progress: dict[str, Any] | None  # rank 0's last trainer_log.jsonl record
    started_at: float | None
    master: str | None = None  # the master node's name

    @property
    def running(self) -> bool:
        return any(n.state == "running" for n in self.nodes)

    @property
    def succeeded(self) -> bool:
        return bool(self.nodes) and all(n.state == "exited" for n in self.nodes)

    @property
    def failed_nodes(self) -> tuple[NodeRun, ...]:
        return tuple(n for n in self.nodes if n.state in FAILED_STATES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def reason(self) -> str | None:
        """Why the run failed, as the supervisors recorded it (the node that saw it first)."""
        reasons = [n for n in self.nodes if n.reason]
        first = next((n for n in reasons if n.reason_by == n.name), reasons[0] if reasons else None)
        return first.reason if first else None

    def format_line(self) -> str:
        states = ", ".join(f"{n.name} {n.state}" + (f" (exit {n.rc})" if n.rc not in (None, 0) else "") for n in self.nodes)
        why = f" | {self.reason}" if self.reason and not self.running else ""
        p = self.progress
        if p:
            loss = f" loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""
            return f"step {p.get('current_steps')}/{p.get('total_steps')}{loss} eta {p.get('remaining_time', '?')} | {states}{why}"
        return f"waiting for the first step | {states}{why}"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    ok: bool
    run_id: str | None
    state: str  # planned | started | succeeded | failed | not-started | detached | stopped
    plan: dict[str, Any] | None
    summary: str
    status: RunStatus | None
    errors: tuple[str, ...]
    run_dir: str | None  # on the controller
    outputs: dict[str, str]
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = self.status.to_dict() if self.status else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def format(self) -> str:
        lines = [self.summary] if self.summary else []
        lines.append(f"run {self.run_id}: {self.state}")
        lines += [f"  {e}".replace("\n", "\n  ") for e in self.errors]
        for what, path in self.outputs.items():
            lines.append(f"  {what}: {path}")
        if self.run_dir:
            lines.append(f"  run directory: {self.run_dir}")
        return "\n".join(lines)


def _extra(base: Mapping[str, Any] | None, **kw: Any) -> dict[str, Any]:
    out = dict(base or {})
    out.update({k: v for k, v in kw.items() if v is not None})
    return out


def _node_runs(run: PlaybookResult) -> tuple[RunStatus, list[str]]:
    results = run.results.get("train") or {}
    nodes, progress, run_id, started = [], None, None, None
    validated = next(iter((run.results.get("validate") or {}).values()), {})
    names = [n["name"] for n in (validated.get("cluster") or {}).get("nodes", [])]
    master = (validated.get("cluster") or {}).get("master")
    for host in names:
        o = run.hosts.get(host)
        if o is None:
            continue
        res = results.get(host) or {}
        r = res.get("run") or {}
        if o.unreachable or res.get("unreachable"):
            nodes.append(NodeRun(host, "unreachable", None, None, ()))
            continue
        state = r.get("state", "absent")
        if state == "exited" and r.get("rc") not in (0, None):
            state = "exited-error"
        watch = r.get("supervisor") or {}
        failed = watch.get("state") in ("failed", "stopped", "error") and state != "running"
        nodes.append(NodeRun(host, state, r.get("rc"), r.get("pid"), tuple(r.get("log_tail") or ()),
                             watch.get("reason") if failed else None, watch.get("by") if failed else None))
        run_id = run_id or r.get("run_id")
        progress = progress or r.get("progress")
        started = started or r.get("started_at")
    return RunStatus(run_id, tuple(nodes), progress, started, master), run.failure_messages() if not run.ok else []


def _run_verb(verb: str, inventory: str | os.PathLike, extravars: dict[str, Any],
              cancel: threading.Event | None = None, limit: str | None = None) -> RunStatus:
    """Run playbooks/<verb>.yml on every node (``limit``: those nodes only); an error before any node answered
    (a bad inventory) is raised. A run cut short by ``cancel`` says nothing: it returns a status without nodes."""
    run = run_playbook(f"{verb}.yml", inventory, verb=verb, extravars=extravars, cancel=cancel, limit=limit)
    st, errors = _node_runs(run)
    if cancel is not None and cancel.is_set():
        return RunStatus(st.run_id, (), None, None)
    if errors and not (run.results.get("train") or {}):  # no node got as far as its answer: a user's error
        raise ConfigError(errors)
    return st


def status(inventory: str | os.PathLike, run_id: str | None = None, *, log_lines: int = 20,
           extravars: Mapping[str, Any] | None = None, cancel: threading.Event | None = None,
           limit: str | None = None) -> RunStatus:
    """Where the run (default: each node's active run) stands on every node (``limit``: on those only)."""
    return _run_verb("status", inventory, _extra(extravars, train_run_id=check_run_id(run_id) or "",
                                                 train_log_lines=log_lines), cancel, limit)


def stop(inventory: str | os.PathLike, run_id: str | None = None, *, grace_s: int = 20,
         extravars: Mapping[str, Any] | None = None) -> RunStatus:
    """Stop every rank of the run on every node that answers (TERM, then KILL)."""
    return _run_verb("stop", inventory, _extra(extravars, train_run_id=check_run_id(run_id) or "",
                                               train_stop_grace_s=grace_s))


def active_run_id(inventory: str | os.PathLike, extravars: Mapping[str, Any] | None = None) -> str:
    """The run the nodes hold as active (the last one started); ConfigError when there is none."""
    st = status(inventory, None, log_lines=0, extravars=extravars)
    if not st.run_id:
        raise ConfigError(f"no run is active on the nodes of {inventory}; pass its run id (the run directories "
                          "under <state_dir>/runs and on the nodes' <root>/runs are named by it)")
    return st.run_id


def collect(inventory: str | os.PathLike, run_id: str | None = None, *,
            extravars: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Copy every node's run directory (logs, exit code; rank 0's adapter, trainer_log.jsonl, loss plot,
    all_results.json; no checkpoints) into ``<state_dir>/runs/<run_id>/nodes/<node>``.
    ``run_id`` None: the nodes' active run."""
    run_id = check_run_id(run_id) or active_run_id(inventory, extravars)
    run_playbook("collect.yml", inventory, verb="collect", extravars=_extra(extravars, train_run_id=run_id))
    return outputs(run_id, extravars, inventory)


def run_dir(run_id: str, extravars: Mapping[str, Any] | None = None, inventory: str | os.PathLike | None = None) -> str:
    """The run's directory on the controller (in the state of the cluster of ``inventory``)."""
    sdir = state_dir((extravars or {}).get("llamafleet_state_dir"), inventory)
    return str(sdir / "runs" / check_name(run_id, "run id"))


def outputs(run_id: str, extravars: Mapping[str, Any] | None = None,
            inventory: str | os.PathLike | None = None) -> dict[str, str]:
    base = Path(run_dir(run_id, extravars, inventory))
    found: dict[str, str] = {}
    for out in sorted(base.glob("nodes/*/output")):
        for name, key in (("adapter_model.safetensors", "adapter"), ("training_loss.png", "loss plot"),
                          ("trainer_log.jsonl", "trainer log"), ("all_results.json", "results")):
            if (out / name).exists():
                found[key] = str(out / name if key != "adapter" else out)
    for log in sorted(base.glob("nodes/*/train.log")):
        found[f"log {log.parent.name}"] = str(log)
    return found


def _telling_lines(lines: tuple[str, ...], keep: int = 10) -> list[str]:
    """The log lines that say what went wrong: the last error raised inside training, before the
    launcher's own wrappers (torchrun's ChildFailedError, llamafactory-cli's CalledProcessError), and first a
    C++ abort's one line (``terminate called ...``), which torchrun reports only as "Signal 6"."""
    wrappers = ("CalledProcessError", "ChildFailedError", "subprocess.py", "launcher.py", "sys.exit(main())",
                "elastic/multiprocessing", "^^^^")
    useful = [line for line in lines if not any(w in line for w in wrappers)]
    aborts = [line for line in useful if "terminate called" in line]  # C++ std::terminate: SIGABRT, no traceback
    errors = [i for i, line in enumerate(useful) if "Error" in line or "Exception" in line]
    if errors:
        end = errors[-1] + 1
        shown = useful[max(0, end - keep):end]
    else:
        shown = useful[-keep:]
    return aborts + [line for line in shown if line not in aborts]


def follow(inventory: str | os.PathLike, run_id: str | None = None, *, poll_s: float = 5,
           extravars: Mapping[str, Any] | None = None, on_status: Callable[[RunStatus], None] | None = None,
           cancel: threading.Event | None = None, stop_on_cancel: bool = False) -> TrainResult:
    """Watch the run (None: the nodes' active run) until every rank exited, then collect its outputs.

    The nodes' supervisors stop every rank when one fails (and say why); a failure seen here is also
    answered with ``stop``, which changes nothing when they already did. A node that does not answer is
    shown and waited for: its supervisor and its peers' decide, not one missed look. ``cancel`` set:
    following ends within a second and the run goes on (state ``detached``), or with ``stop_on_cancel``
    every rank is stopped (state ``stopped``)."""
    run_id = check_run_id(run_id) or active_run_id(inventory, extravars)
    errors: list[str] = []
    st = RunStatus(run_id, (), None, None)
    while True:
        if cancel is not None and cancel.is_set():
            return _cancelled(inventory, run_id, st, stop_on_cancel, extravars)
        st = _look(inventory, run_id, st, extravars, cancel)
        if cancel is not None and cancel.is_set():  # cut short: what it saw says nothing about the run
            return _cancelled(inventory, run_id, st, stop_on_cancel, extravars)
        if on_status:
            on_status(st)
        if st.succeeded:
            state = "succeeded"
            break
        ended = [n for n in st.failed_nodes if n.state != "unreachable"]
        if ended:
            state = "failed"
            if st.reason:
                errors.append(f"the run failed: {st.reason}")
            for n in ended:
                what = {"exited-error": f"exited with code {n.rc}", "lost": "lost its processes without an exit code",
                        "stopped": "was stopped", "absent": "has no such run"}[n.state]
                tail = "\n".join(f"    {line}" for line in _telling_lines(n.log_tail))
                errors.append(f"{n.name} {what}; its last log lines:\n{tail}" if tail and n.state != "stopped"
                              else f"{n.name} {what}")
            stop(inventory, run_id, extravars=extravars)  # what the supervisors did already, or could not
            errors.append("every rank on every node was stopped")
            break
        if cancel is not None:
            cancel.wait(poll_s)
        else:
            time.sleep(poll_s)
    outs = collect(inventory, run_id, extravars=extravars)
    final = status(inventory, run_id, log_lines=0, extravars=extravars)
    return TrainResult(ok=state == "succeeded", run_id=run_id, state=state, plan=None, summary="",
                       status=RunStatus(final.run_id, final.nodes, st.progress, final.started_at),
                       errors=tuple(errors), run_dir=run_dir(run_id, extravars, inventory), outputs=outs, log_path=None)


def _look(inventory: str | os.PathLike, run_id: str, last: RunStatus, extravars: Mapping[str, Any] | None,
          cancel: threading.Event | None) -> RunStatus:
    """One look at the run. While it runs, only the master is asked: its supervisor hears every worker's
    heartbeat and stops the run when one fails, so the master's ranks still running says as much as every
    node's answer, at one node's cost instead of all of theirs (the others are shown as last seen). Every
    node is asked first, and again as soon as the master's ranks are not running or it does not answer."""
    if last.master and last.nodes and all(n.state in ("running", "unreachable") for n in last.nodes):
        look = status(inventory, run_id, log_lines=0, extravars=extravars, cancel=cancel, limit=last.master)
        mine = next((n for n in look.nodes if n.name == last.master), None)
        if mine is not None and mine.state == "running":
            others = tuple(n for n in last.nodes if n.name != last.master)
            return dataclasses.replace(look, nodes=(mine, *others), master=last.master)
        if cancel is not None and cancel.is_set():
            return look
    return status(inventory, run_id, log_lines=60, extravars=extravars, cancel=cancel)


def _cancelled(inventory: str | os.PathLike, run_id: str, last: RunStatus, stop_on_cancel: bool,
               extravars: Mapping[str, Any] | None) -> TrainResult:
    """Following ended by ``cancel``: the run goes on (detached), or every rank is stopped and the logs collected."""
    if not stop_on_cancel:
        return TrainResult(ok=False, run_id=run_id, state="detached", plan=None, summary="",
                           status=last if last.nodes else None, errors=(), run_dir=None, outputs={}, log_path=None)
    final = stop(inventory, run_id, extravars=extravars)
    outs = collect(inventory, run_id, extravars=extravars)
    return TrainResult(ok=False, run_id=run_id, state="stopped", plan=None, summary="", status=final,
                       errors=("interrupted: every rank was stopped",), run_dir=run_dir(run_id, extravars, inventory),
                       outputs=outs, log_path=None)


def train(inventory: str | os.PathLike, config: str | os.PathLike, *, launcher: str = "torchrun",
          master_port: int | None = None, run_id: str | None = None, replace: bool = False, dry_run: bool = False,
          shared_inputs: bool = False, shared_output: bool = False, sync_model: bool = True,
          follow_run: bool = False, workdir: str | os.PathLike | None = None, model_source: str | None = None, hub_fetch: str | None = None,
          start_timeout_s: float | None = None, peer_timeout_s: float | None = None,
          stall_timeout_s: float | None = None, accelerate_config: str | None = None, poll_s: float = 5,
          env: Mapping[str, str] | None = None, fanout: str | None = None, full_check: bool = False,
          extravars: Mapping[str, Any] | None = None, on_event: Callable[[TaskEvent], None] | None = None,
          on_status: Callable[[RunStatus], None] | None = None, cancel: threading.Event | None = None,
          stop_on_cancel: bool = False, fabric_check: Mapping[str, Any] | None = None) -> TrainResult:
    """Validate, plan, sync, check and start ``config`` on every node (``playbooks/train.yml``);
    with ``follow_run``, then follow it to its end and collect its outputs. ``cancel`` set while the
    ranks start lets the start finish (all or nothing), then ends following (see ``follow``).

    Relative paths in the yaml are relative to ``workdir`` (default: this process's working directory),
    as ``llamafactory-cli`` reads them. ``model_source`` (auto, controller, nodes, hub) and ``hub_fetch``
    (nodes, controller) override the inventory's train_model_source and train_hub_fetch.
    ``start_timeout_s``, ``peer_timeout_s`` and ``stall_timeout_s`` override train_start_timeout_s,
    train_peer_timeout_s and train_stall_timeout_s: what the nodes' supervisors hold the run to.
    ``fabric_check`` (settings of ``fabric.check``; {} for the inventory's): the fabric check runs first, and
    nothing trains unless it passes. ``fanout`` (auto, always, never) overrides train_fanout: whether the inputs
    go node to node. ``full_check``: check and judge every node even where the last judged launch still holds
    (no one-wave start; train_fast false)."""
    workdir = _check_train_args(config, run_id, workdir, extravars)
    ev = _extra(extravars, train_config=str(Path(config).resolve()), train_launcher=launcher,
                train_master_port=master_port, train_run_id=run_id or "", train_replace=replace,
                train_dry_run=dry_run, train_shared_inputs=shared_inputs, train_shared_output=shared_output,
                train_sync_model=sync_model,
                train_follow=False, train_workdir=str(workdir), train_model_source=model_source,
                train_hub_fetch=hub_fetch, train_start_timeout_s=start_timeout_s,
                train_peer_timeout_s=peer_timeout_s, train_stall_timeout_s=stall_timeout_s,
                train_accelerate_config=accelerate_config, train_fanout=fanout,
                train_fast=False if full_check else None)
    if env:
        ev["train_env"] = dict(env)
    if fabric_check is not None and not dry_run:
        refused = _fabric_gate(inventory, fabric_check, master_port=master_port, replace=replace, env=env,
                               extravars=extravars, on_event=on_event, cancel=cancel)
        if refused is not None:
            return refused
    run = run_playbook("train.yml", inventory, verb="train", extravars=ev, on_event=on_event)
    planned = next(iter((run.results.get("train_plan") or {}).values()), {})
    plan = planned.get("plan")
    summary = planned.get("summary", "")
    rid = plan["run_id"] if plan else run_id
    if not run.ok:
        return TrainResult(ok=False, run_id=rid, state="not-started", plan=plan, summary=summary, status=None,
                           errors=tuple(dict.fromkeys(run.failure_messages())), run_dir=None, outputs={},
                           log_path=str(run.log_path))
    if dry_run:
        return TrainResult(ok=True, run_id=rid, state="planned", plan=plan, summary=summary, status=None, errors=(),
                           run_dir=None, outputs={}, log_path=str(run.log_path))
    if not follow_run:
        return TrainResult(ok=True, run_id=rid, state="started", plan=plan, summary=summary, status=None, errors=(),
                           run_dir=None, outputs={}, log_path=str(run.log_path))
    done = follow(inventory, rid, poll_s=poll_s, extravars=extravars,
                  on_status=on_status, cancel=cancel, stop_on_cancel=stop_on_cancel)
    return dataclasses.replace(done, plan=plan, summary=summary, log_path=str(run.log_path))


def _check_train_args(config: str | os.PathLike, run_id: str | None, workdir: str | os.PathLike | None,
                      extravars: Mapping[str, Any] | None) -> Path:
    """The launch's own arguments, before any playbook: the run id, the job name, the yaml, the workdir."""
    check_run_id(run_id, "run id (--run-id)")
    if (extravars or {}).get("train_job"):
        from .launchplan import job_name

        job_name(config, str(extravars["train_job"]))
    if not Path(config).is_file():
        raise ConfigError(f"training config {config} does not exist: pass the path of your LLaMA-Factory yaml")
    resolved = Path(workdir or os.getcwd()).resolve()
    if not resolved.is_dir():
        raise ConfigError(f"working directory {resolved} does not exist: pass the directory your yaml's relative "
                          "paths start from (--workdir)")
    return resolved


def _fabric_gate(inventory: str | os.PathLike, settings: Mapping[str, Any], **kw: Any) -> TrainResult | None:
    """The fabric check before a launch: None when it passed, else the launch's refusal with its reasons."""
    from . import fabric

    report = fabric.check(inventory, **{k: v for k, v in settings.items() if v is not None}, **kw)
    if report.ok:
        return None
    why = report.problems + report.errors
    return TrainResult(ok=False, run_id=None, state="not-started", plan=None, summary=report.format(), status=None,
                       errors=(f"the fabric check (run {report.run_id}) failed, so training was not started:",
                               *(f"- {w}" for w in why)),
                       run_dir=None, outputs={}, log_path=report.log_path)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """A run's adapter merged into its base model (``export``): where, what, and whether it loads."""

    ok: bool
    run_id: str
    node: str | None
    base_model: str | None  # on the node
    adapter: str | None  # on the node
    export_dir: str | None  # on the node
    controller_dir: str | None  # the copy on the controller, when fetched
    files: dict[str, int]
    bytes: int
    seconds: float | None
    load_check: dict[str, Any] | None
    errors: tuple[str, ...]
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format(self) -> str:
        if not self.ok:
            return "\n".join([f"export of run {self.run_id}: failed", *(f"  {e}" for e in self.errors)])
        check = self.load_check or {}
        lines = [f"export of run {self.run_id}: merged on {self.node} in {self.seconds:g} s, "
                 f"{self.bytes / 2**20:.1f} MiB in {len(self.files)} files; loads as {check.get('architecture')} "
                 f"({check.get('parameters')} parameters, all in its files)",
                 f"  base model: {self.base_model}", f"  adapter:    {self.adapter}",
                 f"  export:     {self.node}:{self.export_dir}"]
        if self.controller_dir:
            lines.append(f"  copied to:  {self.controller_dir}")
        return "\n".join(lines)


def export(inventory: str | os.PathLike, run_id: str | None = None, *, node: str | None = None,
           export_dir: str | None = None, export_size: int = 5, export_device: str = "cpu", fetch: bool = False,
           extravars: Mapping[str, Any] | None = None,
           on_event: Callable[[TaskEvent], None] | None = None) -> ExportResult:
    """Merge the run's LoRA adapter (None: the nodes' active run) into its base model on ``node`` (default:
    the master, which holds rank 0's adapter) with the run's own stack (``llamafactory-cli export``), check
    that the result loads, and, with ``fetch``, copy it to ``<state_dir>/runs/<run_id>/export``. The run's
    record on the controller (``export.json`` in its run directory) links base model, adapter and export."""
    run_id = check_run_id(run_id) or active_run_id(inventory, extravars)
    ev = _extra(extravars, train_run_id=run_id, train_export_node=node or "", train_export_dir=export_dir or "",
                train_export_size=export_size, train_export_device=export_device, train_export_fetch=fetch)
    run = run_playbook("export.yml", inventory, verb="export", extravars=ev, on_event=on_event)
    done = next((r.get("export") for r in (run.results.get("export") or {}).values() if r.get("export")), None)
    if not run.ok or not done:
        errors = run.failure_messages() or ["the export did not run on any node"]
        if not run.hosts and errors:
            raise ConfigError(errors)
        return ExportResult(False, run_id, None, None, None, None, None, {}, 0, None, None,
                            tuple(dict.fromkeys(errors)), str(run.log_path))
    here = str(Path(run_dir(run_id, extravars, inventory)) / "export") if fetch else None
    result = ExportResult(True, run_id, done["node"], done["base_model"], done["adapter"], done["export_dir"], here,
                          done["files"], done["bytes"], done["seconds"], done["load_check"], (), str(run.log_path))
    record = Path(run_dir(run_id, extravars, inventory))
    record.mkdir(parents=True, exist_ok=True)
    (record / "export.json").write_text(result.to_json() + "\n")
    return result
