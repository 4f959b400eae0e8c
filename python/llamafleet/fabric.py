"""The fabric check: real collectives across every node and GPU, started exactly as training will be.

``check`` runs ``playbooks/train.yml`` with ``train_fabric``: the plan's "job" is ``fabric_probe.py`` (written
into the run directory) instead of a LLaMA-Factory yaml, started with the stack's own torchrun, the node's
rendered node.env and the same rendezvous, under the nodes' supervisors, as every launch check does. NCCL on
CUDA stacks, HCCL on Ascend, gloo on CPU stacks (so it is tested across the namespace nodes for real). The
figures come back in rank 0's ``output/fabric.json``; the thresholds are judged there, by the probe
(``fabric_probe.judge``), so that ``fabric.yml`` and the library fail alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import launchplan
from .errors import ConfigError
from .inventory import Cluster
from .lock import Stack
from .runner import TaskEvent, run_playbook

PROBE = Path(__file__).with_name("fabric_probe.py")
JOB = "fabric"


@dataclasses.dataclass(frozen=True)
class FabricOptions:
    sizes_mb: tuple[float, ...]
    pair_mb: float
    iters: int
    timeout_s: float
    min_gbps: float
    min_ratio: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FabricOptions:
        """The train_fabric_* settings, checked: one message naming the setting and the fix."""
        try:
            sizes = tuple(float(x) for x in d["sizes_mb"])
            opts = cls(sizes_mb=sizes, pair_mb=float(d["pair_mb"]), iters=int(d["iters"]),
                       timeout_s=float(d["timeout_s"]), min_gbps=float(d["min_gbps"]), min_ratio=float(d["min_ratio"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the fabric check's settings are not numbers ({exc}): train_fabric_sizes_mb is a list "
                              "of MB, train_fabric_pair_mb, _iters, _timeout_s, _min_gbps and _min_ratio are numbers")
        if not sizes or any(not 0 < s <= 4096 for s in sizes):
            raise ConfigError("train_fabric_sizes_mb must list sizes between 0 and 4096 MB, e.g. [1, 4, 16, 64, 256]")
        if not 0 < opts.pair_mb <= 4096:
            raise ConfigError("train_fabric_pair_mb must be between 0 and 4096 MB")
        if not 1 <= opts.iters <= 1000:
            raise ConfigError("train_fabric_iters must be between 1 and 1000")
        if opts.timeout_s <= 0:
            raise ConfigError("train_fabric_timeout_s must be more than 0 seconds")
        if opts.min_gbps < 0 or not 0 <= opts.min_ratio < 1:
            raise ConfigError("train_fabric_min_gbps must be 0 or more and train_fabric_min_ratio in [0, 1)")
        return opts


def backend(stack: Stack) -> str:
    """The collective backend training uses on this stack."""
    return "gloo" if stack.cpu_only else "hccl" if stack.npu else "nccl"


class FabricPlan(launchplan.LaunchPlan):
    def format(self, detail: bool = False) -> str:
        p = self.plan
        lines = [f"run {self.run_id}: fabric check over {p['backend']}, world size {p['world_size']} on "
                 f"{len(self.nodes)} nodes, master {p['master']} at {self.master_addr}:{self.master_port}",
                 f"  all_reduce of {', '.join('%g' % s for s in p['sizes_mb'])} MB, each node's link at "
                 f"{p['pair_mb']:g} MB, {p['iters']} iterations; within {p['start_timeout_s']:g} s"]
        for n in sorted(self.nodes.values(), key=lambda n: n.node_rank):
            lines.append(f"  node rank {n.node_rank}: {n.name}" + (" (master)" if n.master else ""))
            if detail:
                lines.append("    command: " + " ".join(n.command))
        return "\n".join(lines)


def make_plan(cluster: Cluster, stack: Stack, options: FabricOptions, *, master_port: int = 29500,
              run_id: str | None = None, cpus: int | None = None,
              extra_env: Mapping[str, str] | None = None) -> FabricPlan:
    """What every node runs for the fabric check: the probe under the stack's torchrun, with the node's env."""
    run_id = run_id or launchplan.new_run_id(JOB)
    probe = PROBE.read_text()
    kind = backend(stack)
    nodes = {}
    for node in cluster.nodes:
        root = node.root.rstrip("/")
        run_dir = f"{root}/runs/{run_id}"
        venv = f"{root}/stacks/{stack.venv_name}"
        public, env = launchplan._node_env(cluster, node, stack, launcher="torchrun", root=root, venv=venv,
                                           run_id=run_id, master_port=master_port, cpus=cpus,
                                           extra_env=dict(extra_env or {}))
        command = [f"{venv}/bin/torchrun", "--nnodes", env["NNODES"], "--node_rank", env["NODE_RANK"],
                   "--nproc_per_node", env["NPROC_PER_NODE"], "--master_addr", env["MASTER_ADDR"],
                   "--master_port", env["MASTER_PORT"], f"{run_dir}/fabric_probe.py",
                   "--backend", kind, "--run-dir", run_dir, "--sizes", ",".join("%g" % s for s in options.sizes_mb),
                   "--pair-mb", "%g" % options.pair_mb, "--iters", str(options.iters),
                   "--timeout", "%g" % options.timeout_s, "--min-gbps", "%g" % options.min_gbps,
                   "--min-ratio", "%g" % options.min_ratio]
        files = {"fabric_probe.py": probe, "node.env": launchplan.launch.render_env_file(public), "hostfile": ""}
        nodes[node.name] = launchplan.NodeLaunch(
            name=node.name, node_rank=node.node_rank, master=node.master, inputs_dir=f"{root}/inputs/{JOB}",
            run_dir=run_dir, env=env, command=command, files=files, hub_cache_dir=f"{root}/cache/huggingface/hub",
            model_check=None)
    world = sum(node.nproc(stack.cpu_only) for node in cluster.nodes)
    plan = {"backend": kind, "world_size": world, "master": cluster.master.name, "total_steps": None,
            "sizes_mb": list(options.sizes_mb), "pair_mb": options.pair_mb, "iters": options.iters,
            # the supervisors hold the check to its timeout: no first result, or none for that long, fails it
            "start_timeout_s": options.timeout_s, "stall_timeout_s": options.timeout_s,
            "fabric": dataclasses.asdict(options)}
    return FabricPlan(run_id=run_id, job=JOB, launcher="torchrun", config="fabric check",
                      master_addr=cluster.master.train_addr, master_port=master_port, shared_inputs=False,
                      stage_dir=None, manifest={}, plan=plan, nodes=nodes, hostfile="", warnings=(),
                      model={"source": "none", "label": "no model (fabric check)"})


@dataclasses.dataclass(frozen=True)
class FabricReport:
    """What the fabric check found: figures per size and per node, the slowest node, and why it failed."""

    ok: bool
    run_id: str | None
    backend: str | None
    world_size: int | None
    latency_us: float | None
    sizes: tuple[dict[str, Any], ...]
    nodes: tuple[dict[str, Any], ...]
    slowest: str | None
    problems: tuple[str, ...]  # a node below a threshold
    errors: tuple[str, ...]  # the check did not complete: why, in words
    run_dir: str | None
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format(self) -> str:
        head = "fabric check: OK" if self.ok else "fabric check: FAILED"
        lines = [head + (f" (run {self.run_id})" if self.run_id else "")]
        lines += [f"  {e}".replace("\n", "\n  ") for e in self.errors]
        lines += [f"  {p}" for p in self.problems]
        if self.sizes:
            lines.append(f"  {self.backend}, world size {self.world_size}, latency {self.latency_us:.1f} us")
            lines.append(f"  {'all_reduce':>12}  {'time':>12}  {'algbw':>12}  {'busbw':>12}")
            for s in self.sizes:
                bus = f"{s['busbw_gbps']:.3f} GB/s" if s.get("busbw_gbps") is not None else "-"
                lines.append(f"  {s['bytes'] / (1 << 20):>9.1f} MB  {s['time_us']:>9.1f} us  "
                             f"{s['algbw_gbps']:>7.3f} GB/s  {bus:>12}")
        for n in self.nodes:
            link = f"{n['link_gbps']:.3f} GB/s" if n.get("link_gbps") is not None else "-"
            intra = f", inside {n['intra_busbw_gbps']:.3f} GB/s" if n.get("intra_busbw_gbps") else ""
            nccl = n.get("nccl") or {}
            via = (f", NCCL {nccl.get('network')} {' '.join(nccl.get('devices') or [])} via "
                   f"{' '.join(nccl.get('transports') or []) or '?'}") if nccl else ""
            mark = "  <- slowest" if n["name"] == self.slowest else ""
            lines.append(f"  {n['name']}: link {link}{intra}, interface {n.get('interface') or '?'}{via}{mark}")
        if self.log_path:
            lines.append(f"log: {self.log_path}")
        return "\n".join(lines)


def read_report(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Rank 0's fabric.json among a run's collected node directories, if any."""
    for path in sorted(Path(run_dir).glob("nodes/*/output/fabric.json")):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def _report(result: Any, run_id: str | None, log_path: str | None) -> FabricReport:
    found = read_report(result.run_dir) if result.run_dir else None
    errors = tuple(e for e in result.errors if not found or "fabric: " not in e)
    if found is None:
        return FabricReport(ok=False, run_id=run_id, backend=None, world_size=None, latency_us=None, sizes=(),
                            nodes=(), slowest=None, problems=(),
                            errors=errors or (f"the fabric check ended {result.state} without its figures",),
                            run_dir=result.run_dir, log_path=log_path)
    problems = tuple(found.get("problems") or ())
    return FabricReport(ok=bool(result.ok and found.get("ok")), run_id=run_id, backend=found.get("backend"),
                        world_size=found.get("world_size"), latency_us=found.get("latency_us"),
                        sizes=tuple(found.get("sizes") or ()), nodes=tuple(found.get("nodes") or ()),
                        slowest=found.get("slowest"), problems=problems,
                        errors=() if problems else errors, run_dir=result.run_dir, log_path=log_path)


def check(inventory: str | os.PathLike, *, sizes_mb: list[float] | None = None, pair_mb: float | None = None,
          iters: int | None = None, timeout_s: float | None = None, min_gbps: float | None = None,
          min_ratio: float | None = None, master_port: int | None = None, replace: bool = False,
          env: Mapping[str, str] | None = None, extravars: Mapping[str, Any] | None = None,
          on_event: Callable[[TaskEvent], None] | None = None, on_status: Callable[[Any], None] | None = None,
          cancel: threading.Event | None = None, poll_s: float = 2) -> FabricReport:
    """Run the fabric check on every node of ``inventory`` and follow it to its end (``playbooks/train.yml``
    with train_fabric). Settings left None are the inventory's train_fabric_* (roles/train/defaults)."""
    from . import training

    ev = training._extra(extravars, train_fabric=True, train_fabric_sizes_mb=list(sizes_mb) if sizes_mb else None,
                         train_fabric_pair_mb=pair_mb, train_fabric_iters=iters, train_fabric_timeout_s=timeout_s,
                         train_fabric_min_gbps=min_gbps, train_fabric_min_ratio=min_ratio,
                         train_master_port=master_port, train_replace=replace, train_follow=False,
                         train_config="", train_run_id="")
    if env:
        ev["train_env"] = dict(env)
    run = run_playbook("train.yml", inventory, verb="fabric", extravars=ev, on_event=on_event)
    planned = next(iter((run.results.get("train_plan") or {}).values()), {})
    run_id = (planned.get("plan") or {}).get("run_id")
    if not run.ok or not run_id:
        return FabricReport(ok=False, run_id=run_id, backend=None, world_size=None, latency_us=None, sizes=(),
                            nodes=(), slowest=None, problems=(),
                            errors=tuple(dict.fromkeys(run.failure_messages())) or ("the fabric check did not start",),
                            run_dir=None, log_path=str(run.log_path))
    done = training.follow(inventory, run_id, poll_s=poll_s, extravars=extravars, on_status=on_status,
                           cancel=cancel, stop_on_cancel=True)
    return _report(done, run_id, str(run.log_path))
