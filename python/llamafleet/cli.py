"""``llamafleet``: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from . import api, fabric, training
from .errors import ConfigError, LlamafleetError
from .parity import ParityReport
from .paths import STATE_ENV
from .runner import TaskEvent


def _parse_extra(values: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise LlamafleetError(f"-e {v!r}: write extra variables as KEY=VALUE")
        out[key] = yaml.safe_load(val) if val else ""
    return out


class Progress:
    """A live per-node view: the task each node is on and how it ended."""

    def __init__(self, console):
        from rich.live import Live

        self.console = console
        self.state: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=True)

    def _render(self):
        from rich.table import Table

        t = Table(show_header=True, header_style="bold", box=None)
        t.add_column("node")
        t.add_column("status")
        t.add_column("task")
        colors = {"failed": "red", "unreachable": "red", "changed": "yellow", "ok": "green", "started": "cyan"}
        for host, (task, status) in sorted(self.state.items()):
            t.add_row(host, f"[{colors.get(status, 'white')}]{status}[/]", task)
        return t

    def __call__(self, ev: TaskEvent) -> None:
        with self.lock:
            self.state[ev.host] = (ev.task, ev.status)
            self.live.update(self._render())
            if ev.status in ("failed", "unreachable"):
                self.live.console.print(f"[red]{ev.host}: {ev.status}[/] {ev.task}")

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)


def _print_parity(console, report: ParityReport, only_problems: bool) -> None:
    from rich.table import Table

    t = Table(title=f"stack parity ({report.flavor}, stack-{report.stack_hash})", header_style="bold")
    t.add_column("component")
    t.add_column("expected")
    for n in report.nodes:
        t.add_column(n)
    for row in report.rows:
        if only_problems and row.ok:
            continue
        cells = [f"[red]{row.found.get(n, '-')}[/]" if n in row.bad else row.found.get(n, "-") for n in report.nodes]
        t.add_row(row.component, row.expected, *cells)
    console.print(t)


def _print_result(console, result: api.StackResult) -> None:
    if result.parity is not None:
        _print_parity(console, result.parity, only_problems=not result.parity.ok)
        for w in result.parity.warnings:
            console.print(f"[yellow]warning:[/] {w}")
    if result.ok:
        console.print(f"[green]{result.verb} OK[/] on {len(result.nodes)} node(s): "
                      + ", ".join(f"{n.name} {n.action}" + (f" ({', '.join(n.repaired)})" if n.repaired else "")
                                  for n in result.nodes))
    else:
        console.print(f"[red]{result.verb} FAILED[/]")
        for e in result.errors:
            console.print(e, markup=False, highlight=False)
        if result.parity is not None and not result.parity.ok:
            for p in result.parity.problems:
                console.print(f"- {p}", markup=False, highlight=False)
    if result.report_path:
        console.print(f"parity report: {result.report_path}", markup=False, highlight=False)
    console.print(f"log: {result.log_path}", markup=False, highlight=False)


def _stack_verb(args, console) -> int:
    kwargs = dict(limit=args.limit, lock_file=args.lock, flavor=args.flavor, extravars=_parse_extra(args.extra))
    if args.serving:
        kwargs["serving"] = args.serving
    if args.verb == "provision":
        kwargs["offline"] = True if args.offline else None
        kwargs["force"] = args.force
    if args.verb == "check" and args.fabric:
        return _fabric(args, console)
    fn = api.provision if args.verb == "provision" else api.check
    if args.json or not console.is_terminal:
        result = fn(args.inventory, **kwargs)
    else:
        with Progress(console) as progress:
            result = fn(args.inventory, on_event=progress, **kwargs)
    if args.json:
        print(result.to_json())
    else:
        _print_result(console, result)
    return 0 if result.ok else 1


class TrainProgress:
    """A live progress bar from rank 0's trainer_log.jsonl: step/total, loss, ETA."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("training", total=None, info="waiting for the first step")

    def __call__(self, st: training.RunStatus) -> None:
        p = st.progress or {}
        info = " ".join(f"{n.name}:{n.state}" for n in st.nodes)
        if p:
            loss = f"loss {p['loss']:.4f} " if isinstance(p.get("loss"), (int, float)) else ""
            info = f"{loss}eta {p.get('remaining_time', '?')} | {info}"
            self.bar.update(self.task, total=p.get("total_steps"), completed=p.get("current_steps") or 0, info=info)
        else:
            self.bar.update(self.task, info=info)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def _print_train(console, result: training.TrainResult) -> None:
    if result.summary:
        console.print(result.summary, markup=False, highlight=False)
    color = "green" if result.ok else "red"
    console.print(f"[{color}]run {result.run_id}: {result.state}[/]")
    for e in result.errors:
        console.print(e, markup=False, highlight=False)
    for what, path in result.outputs.items():
        console.print(f"{what}: {path}", markup=False, highlight=False)
    if result.run_dir:
        console.print(f"run directory: {result.run_dir}", markup=False, highlight=False)
    if result.log_path:
        console.print(f"log: {result.log_path}", markup=False, highlight=False)


class Interrupts:
    """While following: the first SIGINT (Ctrl-C), SIGTERM or SIGHUP sets ``event`` (following ends, the
    run goes on); a second SIGINT gives up at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        self.event.set()

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def _print_detached(console, result: training.TrainResult, inventory: str) -> None:
    run, inv = shlex.quote(result.run_id or ""), shlex.quote(str(inventory))
    console.print(f"stopped following; run {result.run_id} goes on on the nodes.", markup=False, highlight=False)
    for what, verb in (("follow it again", "follow"), ("see it", "status"), ("its logs", "logs"), ("stop it", "stop")):
        console.print(f"  {what + ':':17}llamafleet {verb} {run} -i {inv}", markup=False, highlight=False)


def _print_followed(console, args, result: training.TrainResult, interrupts: Interrupts) -> int:
    if args.json:
        print(result.to_json())
    elif result.state == "detached":
        _print_detached(console, result, args.inventory)
    else:
        _print_train(console, result)
    if result.state in ("detached", "stopped"):
        return interrupts.exit_code
    return 0 if result.ok else 1


def _train(args, console) -> int:
    kwargs = dict(launcher=args.launcher, master_port=args.port, run_id=args.run_id, replace=args.replace,
                  dry_run=args.dry_run, shared_inputs=args.shared_inputs, sync_model=not args.no_sync_model,
                  follow_run=args.follow, start_timeout_s=args.start_timeout, peer_timeout_s=args.peer_timeout,
                  stall_timeout_s=args.stall_timeout, accelerate_config=args.accelerate_config,
                  extravars=_parse_extra(args.extra),
                  workdir=args.workdir, model_source=args.model_source, hub_fetch=args.hub_fetch,
                  shared_output=args.shared_output, fanout=args.fanout, full_check=args.full_check,
                  fabric_check=_fabric_kwargs(args) if args.fabric_check else None)
    with Interrupts() as interrupts:
        kwargs.update(cancel=interrupts.event, stop_on_cancel=args.stop_on_interrupt)
        if args.json or not console.is_terminal:
            result = training.train(args.inventory, args.config, **kwargs,
                                    on_status=None if args.json else (lambda st: console.print(st.format_line(), markup=False)))
        else:
            with Progress(console) as progress:
                result = training.train(args.inventory, args.config, **{**kwargs, "follow_run": False}, on_event=progress)
            if result.ok and args.follow and not args.dry_run:
                if result.summary:
                    console.print(result.summary, markup=False, highlight=False)
                with TrainProgress(console) as bar:
                    done = training.follow(args.inventory, result.run_id, extravars=kwargs["extravars"], on_status=bar, cancel=interrupts.event,
                                           stop_on_cancel=args.stop_on_interrupt)
                import dataclasses

                # the summary was printed before following
                result = dataclasses.replace(done, plan=result.plan, summary="", log_path=result.log_path)
        return _print_followed(console, args, result, interrupts)


def _follow(args, console) -> int:
    extra = _parse_extra(args.extra)
    with Interrupts() as interrupts:
        kw = dict(extravars=extra, cancel=interrupts.event,
                  stop_on_cancel=args.stop_on_interrupt)
        if args.json or not console.is_terminal:
            result = training.follow(args.inventory, args.run_id, **kw,
                                     on_status=None if args.json else (lambda st: console.print(st.format_line(), markup=False)))
        else:
            with TrainProgress(console) as bar:
                result = training.follow(args.inventory, args.run_id, on_status=bar, **kw)
        return _print_followed(console, args, result, interrupts)


def _collect(args, console) -> int:
    extra = _parse_extra(args.extra)
    run_id = args.run_id or training.active_run_id(args.inventory, extra)
    outs = training.collect(args.inventory, run_id, extravars=extra)
    if args.json:
        print(json.dumps({"run_id": run_id, "run_dir": training.run_dir(run_id, extra, args.inventory), "outputs": outs},
                         indent=2, sort_keys=True))
        return 0
    console.print(f"run {run_id}: collected", markup=False, highlight=False)
    for what, path in outs.items():
        console.print(f"{what}: {path}", markup=False, highlight=False)
    console.print(f"run directory: {training.run_dir(run_id, extra, args.inventory)}", markup=False, highlight=False)
    return 0


def _export(args, console) -> int:
    kw = dict(node=args.node, export_dir=args.export_dir, export_size=args.export_size,
              export_device=args.export_device, fetch=args.fetch, extravars=_parse_extra(args.extra))
    if args.json or not console.is_terminal:
        result = training.export(args.inventory, args.run_id, **kw)
    else:
        with Progress(console) as progress:
            result = training.export(args.inventory, args.run_id, on_event=progress, **kw)
    if args.json:
        print(result.to_json())
    else:
        console.print(result.format(), markup=False, highlight=False)
    return 0 if result.ok else 1


def _serve(args, console) -> int:
    from . import serving

    extra = _parse_extra(args.extra)
    if args.status or args.stop:
        fn = serving.serve_status if args.status else serving.serve_stop
        result = fn(args.inventory, args.run_id, nodes=args.node, extravars=extra)
    else:
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
        kw = dict(nodes=args.node, model="export" if args.export else "adapter", host=args.host, port=args.port,
                  name=args.name, api_key=key, ready_timeout_s=args.ready_timeout, backend=args.backend,
                  tensor_parallel=args.tensor_parallel, vllm_args=args.vllm_arg, extravars=extra)
        if args.json or not console.is_terminal:
            result = serving.serve(args.inventory, args.run_id, **kw)
        else:
            with Progress(console) as progress:
                result = serving.serve(args.inventory, args.run_id, on_event=progress, **kw)
    if args.json:
        print(result.to_json())
    else:
        console.print(result.format(), markup=False, highlight=False)
    return 0 if result.ok else 1


def _run_verb(args, console) -> int:
    extra = _parse_extra(args.extra)
    if args.verb == "stop":
        st = training.stop(args.inventory, args.run_id, extravars=extra)
    else:
        st = training.status(args.inventory, args.run_id, log_lines=getattr(args, "lines", 20), extravars=extra)
    if args.json:
        print(json.dumps(st.to_dict(), indent=2, sort_keys=True))
        return 0
    if args.verb == "logs":
        for n in st.nodes:
            if args.node and n.name != args.node:
                continue
            console.print(f"==> {n.name} ({n.state}) <==", markup=False, highlight=False)
            for line in n.log_tail:
                console.print(line, markup=False, highlight=False)
        return 0
    console.print(f"run {st.run_id or '(none)'}: " + st.format_line(), markup=False, highlight=False)
    return 0


def _common(s: argparse.ArgumentParser, func, inventory_help: str = "inventory directory or file") -> None:
    """The options every verb has: the inventory, where its state is, extra variables, JSON output."""
    s.add_argument("-i", "--inventory", required=True, help=inventory_help)
    s.add_argument("--state-dir", help="controller state of this cluster (default: $LLAMAFLEET_STATE_DIR, else "
                   ".llamafleet beside the inventory)")
    s.add_argument("-e", "--extra", action="append", default=[], metavar="KEY=VALUE", help="extra variable, repeatable")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=func)


def _fabric_options(s: argparse.ArgumentParser) -> None:
    """The fabric check's settings (defaults: the inventory's train_fabric_*, see roles/train/defaults)."""
    s.add_argument("--fabric-sizes", type=lambda v: [float(x) for x in v.split(",")], metavar="MB,MB,...",
                   help="all_reduce sizes in MB (default 1,4,16,64,256)")
    s.add_argument("--fabric-pair-mb", type=float, help="size of each node link's test in MB (default 64)")
    s.add_argument("--fabric-iters", type=int, help="timed iterations per size (default 5)")
    s.add_argument("--fabric-timeout", type=float, help="seconds the check may take to rendezvous and run each "
                   "collective (default 300)")
    s.add_argument("--fabric-min-gbps", type=float, help="fail when a node's link carries less, GB/s (default 0: off)")
    s.add_argument("--fabric-min-ratio", type=float, help="fail when a node's link carries less than this share of "
                   "the nodes' median (default 0.5; three nodes or more)")


def _fabric_kwargs(args) -> dict[str, Any]:
    return dict(sizes_mb=args.fabric_sizes, pair_mb=args.fabric_pair_mb, iters=args.fabric_iters,
                timeout_s=args.fabric_timeout, min_gbps=args.fabric_min_gbps, min_ratio=args.fabric_min_ratio)


def _fabric(args, console) -> int:
    kwargs = dict(_fabric_kwargs(args), extravars=_parse_extra(args.extra))
    with Interrupts() as interrupts:
        kwargs["cancel"] = interrupts.event
        if args.json or not console.is_terminal:
            result = fabric.check(args.inventory, **kwargs,
                                  on_status=None if args.json else (lambda st: console.print(st.format_line(), markup=False)))
        else:
            with Progress(console) as progress:
                result = fabric.check(args.inventory, on_event=progress, **kwargs)
    if args.json:
        print(result.to_json())
    else:
        console.print(result.format(), markup=False, highlight=False)
    return 0 if result.ok else 1


def _add_stack_verbs(sub) -> None:
    """provision and check: the stack on every node."""
    for verb, text in (("provision", "build the lock's stack on every node (or only --limit ones), then prove parity"),
                       ("check", "probe every node and compare with each other and the lock; changes nothing")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("--limit", help="only these nodes (Ansible pattern); parity still compares with every node")
        s.add_argument("--lock", help="stack lock file (default: the packaged default lock)")
        s.add_argument("--flavor", help="lock flavor: cpu, cu128, system, ... (default: the inventory's llamafleet_flavor)")
        s.add_argument("--serving", metavar="NAME", help="a serving stack of the lock (vllm: it pins its own torch) "
                       "instead of the training stack: a venv of its own, on the nodes that serve (--limit)")
        if verb == "check":
            s.add_argument("--fabric", action="store_true", help="instead: real all_reduce collectives across every "
                           "node and GPU, started as training is; bandwidth per size and per node, the slowest named")
            _fabric_options(s)
        if verb == "provision":
            s.add_argument("--offline", action="store_true", help="build a wheelhouse here and install nodes from it (pip --no-index)")
            s.add_argument("--force", action="store_true", help="change a stack venv even while a running run's ranks "
                           "use it (refused otherwise)")
        _common(s, _stack_verb, "inventory directory or file (e.g. inventory/local)")


def _add_train(sub) -> None:
    """train: validate, sync and start a run."""
    t = sub.add_parser("train", help="validate, sync and start a LLaMA-Factory yaml on every node (--follow to watch it)")
    t.add_argument("config", help="your LLaMA-Factory training yaml, unchanged")
    t.add_argument("--launcher", choices=["torchrun", "deepspeed", "accelerate"], default="torchrun",
                   help="torchrun: llamafactory-cli under FORCE_TORCHRUN on every node; deepspeed: DeepSpeed's launcher; "
                        "accelerate: accelerate launch (FSDP with --accelerate-config)")
    t.add_argument("--accelerate-config", help="with --launcher accelerate: your accelerate config (e.g. FSDP); its "
                   "machine and rendezvous keys are set per node")
    t.add_argument("--port", type=int, help="rendezvous port on the master (default 29500)")
    t.add_argument("--run-id", help="an existing run's id to continue it from its last checkpoint, or a new id")
    t.add_argument("--replace", action="store_true", help="stop a run still active on the nodes instead of refusing")
    t.add_argument("--dry-run", action="store_true", help="print the plan, each node's command, environment and hostfile; change nothing")
    t.add_argument("--follow", action="store_true", help="follow the run: progress, stop all ranks if one fails, collect outputs")
    t.add_argument("--shared-inputs", action="store_true", help="data is already on every node at the same paths (NFS): verify, do not copy")
    t.add_argument("--no-sync-model", action="store_true", help="do not copy a local model directory to the nodes")
    t.add_argument("--fanout", choices=["auto", "always", "never"],
                   help="inputs to the nodes that lack them node to node, crossing this machine's uplink once (default "
                   "auto: when two nodes or more lack them and they hold train_fanout_min_mb, 200 MB, or more)")
    t.add_argument("--full-check", action="store_true", help="check and judge every node before the start even "
                   "when the last judged launch of this job still holds on all of them (by default such a relaunch "
                   "is one task per node)")
    t.add_argument("--shared-output", action="store_true", help="the yaml's output_dir (absolute) is on storage every "
                   "node shares: rank 0 writes it, resume reads it in place (checked at start)")
    t.add_argument("--workdir", help="directory the yaml's relative paths start from, as for llamafactory-cli "
                   "(default: the current directory, e.g. the root of your LLaMA-Factory checkout)")
    t.add_argument("--model-source", choices=["auto", "controller", "nodes", "hub"],
                   help="where model_name_or_path is (default auto: a directory here, else an absolute path on the "
                   "nodes, else a hub id)")
    t.add_argument("--hub-fetch", choices=["nodes", "controller"],
                   help="who fetches hub models and datasets: every node (default; HF_ENDPOINT mirrors honoured) or "
                   "this machine once, then synced (default when the stack is offline)")
    t.add_argument("--start-timeout", type=float, help="seconds without a first training step before the nodes stop "
                   "every rank (default: train_start_timeout_s, 900)")
    t.add_argument("--peer-timeout", type=float, help="seconds without a node's heartbeat before the nodes stop every "
                   "rank (default: train_peer_timeout_s, 30)")
    t.add_argument("--stall-timeout", type=float, help="seconds without progress after the first step before the "
                   "nodes stop every rank (default: train_stall_timeout_s, 1800; 0 = never)")
    t.add_argument("--stop-on-interrupt", action="store_true",
                   help="Ctrl-C (or SIGTERM, SIGHUP) while following stops every rank; without it the run goes on")
    t.add_argument("--fabric-check", action="store_true", help="first run the fabric check (llamafleet check "
                   "--fabric); start training only when it passes")
    _fabric_options(t)
    _common(t, _train)


def _add_follow_and_collect(sub) -> None:
    """follow and collect: one run, after its start."""
    f = sub.add_parser("follow", help="follow a run again: live progress, stop all ranks if one fails, collect outputs",
                       description="Re-attach to a run: the same live view as train --follow. Ctrl-C detaches again.")
    f.add_argument("run_id", nargs="?", help="run id (default: the nodes' active run)")
    f.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C (or SIGTERM, SIGHUP) stops every rank")
    _common(f, _follow)
    c = sub.add_parser("collect", help="copy every node's log and rank 0's outputs of a run to this machine",
                       description="Copy every node's run directory (logs, exit code, rank 0's adapter, trainer log, "
                                   "loss plot; no checkpoints, no node.env) into <state_dir>/runs/RUN_ID/nodes/.")
    c.add_argument("run_id", nargs="?", help="run id (default: the nodes' active run)")
    _common(c, _collect)


def _add_export(sub) -> None:
    """export: merge a run's adapter."""
    x = sub.add_parser("export", help="merge a run's LoRA adapter into its base model on a node, and check it loads",
                       description="Merge a run's adapter into its base model with the run's own stack "
                                   "(llamafactory-cli export) on one node, check that the result loads, and copy it "
                                   "here with --fetch.")
    x.add_argument("run_id", nargs="?", help="run id (default: the nodes' active run)")
    x.add_argument("--node", help="the node that merges (default: the master, which holds rank 0's adapter)")
    x.add_argument("--export-dir", help="absolute path on that node (default: <run dir>/export)")
    x.add_argument("--export-size", type=int, default=5, help="largest shard in GB (default 5)")
    x.add_argument("--export-device", choices=["cpu", "auto"], default="cpu", help="where the merge runs (default cpu)")
    x.add_argument("--fetch", action="store_true", help="copy the merged model to <state_dir>/runs/RUN_ID/export")
    _common(x, _export)


def _add_serve(sub) -> None:
    """serve: an OpenAI-compatible API for a run's adapter or export."""
    v = sub.add_parser("serve", help="serve a run's adapter (or export) behind an OpenAI-compatible API on a node",
                       description="Serve a run's LoRA adapter (or its merged export) with llamafactory-cli api from "
                                   "the run's own stack, or vllm serve from the lock's vllm serving stack, bound to the node's training address, with an API key; "
                                   "ready when a real chat completion came back. --status and --stop for servers.")
    v.add_argument("run_id", help="the run to serve")
    v.add_argument("--node", action="append", default=[], help="a node that serves (repeatable; default: the master)")
    v.add_argument("--export", action="store_true", help="serve the merged model of `llamafleet export`, not the adapter")
    v.add_argument("--host", help="address to listen on (default: the node's training address)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    v.add_argument("--name", help="model name the API lists (default: the run id)")
    v.add_argument("--api-key-env", metavar="VAR", help="take the API key from this environment variable (default: "
                   "$LLAMAFLEET_API_KEY, else one kept in <state_dir>/servers/RUN_ID.key)")
    v.add_argument("--ready-timeout", type=int, default=900, help="seconds to load and answer (default 900)")
    v.add_argument("--backend", choices=["auto", "api", "vllm"], help="auto (default): vLLM on CUDA stacks whose lock "
                   "has a vllm serving stack, llamafactory-cli api elsewhere; vllm needs `llamafleet provision "
                   "--serving vllm --limit NODE` first")
    v.add_argument("--tensor-parallel", type=int, help="vLLM's tensor parallel size (default: the largest the "
                   "model's heads and the node's GPUs allow)")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="one more argument for vllm serve, "
                   "e.g. --vllm-arg=--max-model-len=4096 (repeatable; never the API key)")
    what = v.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="where the run's servers stand")
    what.add_argument("--stop", action="store_true", help="stop the run's servers")
    _common(v, _serve)


def _add_run_verbs(sub) -> None:
    """status, logs and stop: one run on every node."""
    for verb, text in (("status", "where a run stands on every node"), ("logs", "the last log lines of every node"),
                       ("stop", "stop every rank of a run on every node")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("run_id", nargs="?", help="run id (default: each node's active run)")
        if verb == "logs":
            s.add_argument("--node", help="only this node")
            s.add_argument("-n", "--lines", type=int, default=50, help="lines per node (default 50)")
        _common(s, _run_verb)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamafleet", description="Identical training stacks and multi-node "
                                "LLaMA-Factory runs on your GPU servers, with Ansible.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    _add_stack_verbs(sub)
    _add_train(sub)
    _add_follow_and_collect(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_run_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    if args.state_dir:  # one place every part reads it from: the library, the runner and the playbooks' default
        os.environ[STATE_ENV] = str(Path(args.state_dir).expanduser().resolve())
    console = Console(stderr=False, highlight=False, soft_wrap=True)
    try:
        return args.func(args, console)
    except LlamafleetError as exc:
        print(f"llamafleet: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llamafleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
