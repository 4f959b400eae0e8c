#!/usr/bin/env python3
"""Benchmark (issue 2): no-op re-provision of N network-namespace nodes against pdsh on the same nodes.

    .venv/bin/python bench/provision_noop.py [--nodes 8] [--rounds 5] [--workdir DIR] [--slot 2]

Brings up a testbed (tests/testbed.py: one netns + real sshd per node), provisions the light lock
once (offline) so that every later run is a no-op, then runs N rounds of, in this order:

  ansible-playbook (warm)     ansible-playbook provision.yml from the project dir (its ansible.cfg:
                              pipelining, ControlPersist=120s), -e llamafleet_lock_file, stack_offline
  library provision() (warm)  llamafleet.provision(inv, lock_file=..., offline=True) (ansible-runner)
  ansible-playbook (cold)     the same CLI run with a new control path dir: every connection is new
  pdsh (ControlPersist)       pdsh -S -R ssh -w IP,... true with the inventory's ssh options plus
                              ControlMaster=auto/ControlPersist=120s like ansible.cfg
  pdsh (plain)                the same without connection sharing (a new SSH connection per node)
  floor: no-task play         ansible-playbook of a play without tasks (the CLI's fixed cost)
  floor: 1 ping task (warm)   one ping task per node, same tuning (the least a playbook with one
                              task per node costs)
  ref: pipelining off         provision.yml with Ansible's default connection settings (no
                              pipelining, default ssh_args, own control path dir) [--ref-rounds]
  ref: naive playbook         bench/naive_noop.yml: gather_facts + one task per check, Ansible's
                              defaults [--ref-rounds]

A warm-up round of the non-reference methods comes first and is not counted. "warm" methods are
measured with their persistent connections open: if more than KEEP_WARM_S passed since their last
use, an unmeasured keep-warm run (`ansible -m ping` / pdsh) reopens them first. Targets pair like
with like: warm runs against pdsh with ControlPersist, the cold run against plain pdsh.

Per run it measures wall seconds, controller CPU seconds and node CPU seconds per node; every
Ansible run must report changed=0 / failed=0 / unreachable=0 for every node in PLAY RECAP (the
library: result.ok, result.changed == 0), every pdsh run must exit 0 (-S), or the run counts as
an error (pdsh output with rc 0, e.g. noise of a node's shell startup, is a warning). Prints a
table, writes bench/results/provision_noop-<date>.json, and a task profile of --profile-runs extra
warm ansible-playbook runs (bench/callback_plugins/lf_task_timing.py), medians per task.
Exits non-zero only on errors; missing the target (ratio <= 5) prints MISS.

CPU accounting (method printed and saved):
  cgroup v2 (preferred): one cgroup per node holding that node's sshd listener, so every session
    and command started over SSH on the node is counted (cpu.stat usage_usec); one cgroup for the
    controller side holding this process and therefore everything it starts, ansible-playbook,
    forks, ssh clients and the ssh ControlMaster processes included.
  /proc (fallback): CPU of the live process tree under each sshd listener (utime+stime+cutime+
    cstime of every live process: children that exited are in their parent's cutime); controller
    = getrusage(RUSAGE_CHILDREN) + RUSAGE_SELF (misses detached ssh ControlMaster processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

PROJECT = pathlib.Path(__file__).resolve().parents[1]
BENCH = PROJECT / "bench"
LIGHT_LOCK = PROJECT / "tests" / "locks" / "light.yml"
NAIVE_PLAYBOOK = BENCH / "naive_noop.yml"
TARGET_RATIO = 5.0
# Both ansible.cfg and the pdsh baseline use ControlPersist=120s: a "warm" method whose connections were
# last used longer ago than this gets an unmeasured keep-warm run first, so that it is measured warm.
KEEP_WARM_S = 90.0
sys.path.insert(0, str(PROJECT / "tests"))

from testbed import Testbed  # noqa: E402

import yaml  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
# Ansible's own defaults for [ssh_connection] ssh_args (what "plain default Ansible" uses).
ANSIBLE_DEFAULT_SSH_ARGS = "-C -o ControlMaster=auto -o ControlPersist=60s"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Method:
    name: str
    kind: str  # main | baseline | floor | reference
    fn: Callable[[], list[str]]
    warm: str | None = None  # group of persistent connections it relies on (kept open between its runs)


# -- CPU accounting ----------------------------------------------------------------------------

def _cgroup2_mount() -> pathlib.Path | None:
    try:
        for line in pathlib.Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return pathlib.Path(parts[1])
    except OSError:
        pass
    return None


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime seconds) of a process, None if gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the comm: state ppid ... utime(14) stime(15) cutime(16) cstime(17) -> indexes 11..14 here
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK


class CPUAccounting:
    """Node-side CPU per node and controller-side CPU, read before and after each run."""

    def __init__(self, nodes, listener_pids: dict[str, int], force_proc: bool = False):
        self.nodes = [n.name for n in nodes]
        self.listeners = listener_pids
        self.base: pathlib.Path | None = None
        self.method = "proc"
        self._moved_self = False
        mount = None if force_proc else _cgroup2_mount()
        if mount is not None:
            try:
                self._setup_cgroups(mount)
                self.method = "cgroup2"
            except OSError as exc:
                print(f"cgroup v2 accounting unavailable ({exc}); falling back to /proc", file=sys.stderr)
                self.cleanup()
                self.method = "proc"

    def describe(self) -> str:
        if self.method == "cgroup2":
            return (f"cgroup v2 cpu.stat usage_usec: one cgroup per node holding its sshd listener (all sessions "
                    f"inherit it), one for the controller side (this process and all it starts, ssh "
                    f"ControlMaster processes included) under {self.base}")
        return ("/proc: CPU of the live process tree under each node's sshd listener (utime+stime+cutime+cstime); "
                "controller = getrusage(RUSAGE_CHILDREN)+RUSAGE_SELF (detached ssh ControlMaster processes missed)")

    def _setup_cgroups(self, mount: pathlib.Path) -> None:
        base = mount / f"lfbench-{os.getpid()}"
        base.mkdir()
        self.base = base
        for name in self.nodes:
            (base / name).mkdir()
            (base / name / "cgroup.procs").write_text(f"{self.listeners[name]}\n")
        (base / "controller").mkdir()
        (base / "controller" / "cgroup.procs").write_text(f"{os.getpid()}\n")
        self._moved_self = True
        # the accounting must actually move: read it back
        for name in self.nodes:
            pids = (base / name / "cgroup.procs").read_text().split()
            if str(self.listeners[name]) not in pids:
                raise OSError(f"sshd {self.listeners[name]} of {name} did not move into {base / name}")
        self._usage(base / "controller")

    @staticmethod
    def _usage(cg: pathlib.Path) -> float:
        for line in (cg / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
        raise OSError(f"no usage_usec in {cg}/cpu.stat")

    def _tree_cpu(self) -> dict[str, float]:
        table = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _proc_stat(int(entry))
                if st:
                    table[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out = {}
        for name, root in self.listeners.items():
            total, stack = 0.0, [root]
            while stack:
                pid = stack.pop()
                if pid in table:
                    total += table[pid][1]
                    stack += children.get(pid, [])
            out[name] = total
        return out

    def snapshot(self) -> dict:
        ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
        ru_s = resource.getrusage(resource.RUSAGE_SELF)
        snap = {"rusage": ru_c.ru_utime + ru_c.ru_stime + ru_s.ru_utime + ru_s.ru_stime}
        if self.method == "cgroup2":
            snap["nodes"] = {n: self._usage(self.base / n) for n in self.nodes}
            snap["controller"] = self._usage(self.base / "controller")
        else:
            snap["nodes"] = self._tree_cpu()
            snap["controller"] = snap["rusage"]
        return snap

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        return {
            "controller_cpu_s": b["controller"] - a["controller"],
            "controller_cpu_rusage_s": b["rusage"] - a["rusage"],
            "node_cpu_s": {n: b["nodes"][n] - a["nodes"][n] for n in a["nodes"]},
        }

    def cleanup(self) -> None:
        """Move every process back to the root cgroup (kills nothing) and remove the cgroups."""
        if self.base is None:
            return
        root_procs = self.base.parent / "cgroup.procs"
        for cg in sorted(self.base.iterdir()) if self.base.exists() else []:
            if not cg.is_dir():
                continue
            for _ in range(3):
                try:
                    pids = (cg / "cgroup.procs").read_text().split()
                except OSError:
                    break
                for pid in pids:
                    try:
                        root_procs.write_text(f"{pid}\n")
                    except OSError:
                        pass  # exited meanwhile
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.2)
        try:
            self.base.rmdir()
        except OSError as exc:
            print(f"warning: could not remove {self.base}: {exc}", file=sys.stderr)
        self.base = None


# -- the methods ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = pathlib.Path(args.workdir).resolve()
        self.tb = Testbed(self.workdir / "testbed", nodes=args.nodes, slot=args.slot)
        self.inv = self.tb.inventory_path
        self.naive_inv = self.workdir / "testbed" / "inventory" / "naive.yml"
        self.pdsh_cp_dir = self.workdir / "cp-pdsh"
        self.default_cp_dir = self.workdir / "cp-defaults"
        self.timing_file = self.workdir / "task-timing.jsonl"
        self.acct: CPUAccounting | None = None
        self.cold_runs = 0
        self.warnings: list[str] = []
        self.last_used: dict[str, float] = {}
        self.keep_warms: dict[str, int] = {}
        for d in (self.pdsh_cp_dir, self.default_cp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = yaml.safe_load(LIGHT_LOCK.read_text())

    # environments ---------------------------------------------------------------------------

    def _env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["ANSIBLE_CONFIG"] = str(PROJECT / "ansible.cfg")
        env["ANSIBLE_NOCOLOR"] = "1"
        env.update(extra)
        return env

    def _defaults_env(self) -> dict[str, str]:
        # Ansible's defaults for the connection: no pipelining, its default ssh_args (ControlPersist=60s),
        # an own control path dir (never the tuned runs' masters). forks stays >= the node count.
        return self._env(ANSIBLE_PIPELINING="False", ANSIBLE_SSH_ARGS=ANSIBLE_DEFAULT_SSH_ARGS,
                         ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.default_cp_dir), ANSIBLE_GATHERING="implicit")

    def _cold_env(self) -> dict[str, str]:
        # the project's ansible.cfg as is, but a control path dir of its own per run: every connection is new
        self.cold_runs += 1
        path = self.workdir / "cp-cold" / str(self.cold_runs)
        path.mkdir(parents=True, exist_ok=True)
        return self._env(ANSIBLE_SSH_CONTROL_PATH_DIR=str(path))

    def _pdsh_env(self, persist: bool) -> dict[str, str]:
        # the testbed's ssh options (key, known_hosts, StrictHostKeyChecking=yes, BatchMode, User=root), as the
        # inventory has them; pdsh splits PDSH_SSH_ARGS_APPEND on spaces (no value here holds one)
        opts = list(self.tb.ssh_args())
        if persist:
            # like ansible.cfg's ssh_args: ControlMaster=auto, ControlPersist=120s, ServerAliveInterval=15
            opts += ["-o", "ControlMaster=auto", "-o", "ControlPersist=120s", "-o", "ServerAliveInterval=15",
                     "-o", f"ControlPath={self.pdsh_cp_dir}/%C"]
        else:
            opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ServerAliveInterval=15"]
        return {**os.environ, "PDSH_SSH_ARGS_APPEND": " ".join(opts)}

    # runs -------------------------------------------------------------------------------------

    def _extra_vars(self) -> list[str]:
        return ["-e", json.dumps({"llamafleet_lock_file": str(LIGHT_LOCK), "stack_offline": True})]

    def _check_recap(self, out: str, rc: int) -> list[str]:
        errors = []
        if rc != 0:
            errors.append(f"rc={rc}")
        recap = {m.group(1): tuple(int(x) for x in m.groups()[1:]) for m in RECAP.finditer(out)}
        for n in self.tb.nodes:
            if n.name not in recap:
                errors.append(f"{n.name} missing from PLAY RECAP")
                continue
            ok, changed, unreachable, failed = recap[n.name]
            if changed or unreachable or failed:
                errors.append(f"{n.name}: changed={changed} unreachable={unreachable} failed={failed}")
        if errors:
            errors.append("output tail: " + out[-1500:])
        return errors

    @staticmethod
    def _check_rc(out: str, rc: int) -> list[str]:
        return [] if rc == 0 else [f"rc={rc}: {out[-1500:]}"]

    def _subprocess(self, argv, env, check) -> list[str]:
        proc = subprocess.run(argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        return check(proc.stdout, proc.returncode)

    def run_playbook_cli(self, playbook, env, check=None) -> list[str]:
        argv = [str(ANSIBLE_PLAYBOOK), str(playbook), "-i", str(self.inv), *self._extra_vars()]
        return self._subprocess(argv, env, check or self._check_recap)

    def run_library(self) -> list[str]:
        from llamafleet import provision
        res = provision(self.inv, lock_file=LIGHT_LOCK, offline=True)
        errors = []
        if not res.ok:
            errors.append("not ok: " + "; ".join(res.errors))
        if res.changed != 0:
            errors.append(f"changed={res.changed}")
        if len(res.nodes) != len(self.tb.nodes) or not all(n.ok for n in res.nodes):
            errors.append("nodes: " + ", ".join(f"{n.name}={n.action}" for n in res.nodes))
        if errors:
            errors.append(f"log: {res.log_path}")
        return errors

    def run_pdsh(self, persist: bool) -> list[str]:
        ips = ",".join(n.ip for n in self.tb.nodes)
        argv = ["pdsh", "-S", "-R", "ssh", "-f", str(max(32, len(self.tb.nodes))), "-w", ips, "true"]

        def check(out, rc):
            if rc != 0:
                return [f"rc={rc}: {out[-800:]}"]
            if out.strip():
                # rc 0 (-S: the largest remote status) with output: noise of the nodes' shell startup
                # (seen here: root's .bashrc runs `pyenv init`, which can complain); kept as a warning
                self.warnings.append(f"pdsh printed (rc 0): {out.strip()[-400:]}")
                print(f"  warning: {self.warnings[-1]}", flush=True)
            return []
        return self._subprocess(argv, self._pdsh_env(persist), check)

    def methods(self) -> list[Method]:
        tuned = self._env()
        provision_yml = PROJECT / "provision.yml"
        m = [
            Method("ansible-playbook (warm)", "main", lambda: self.run_playbook_cli(provision_yml, tuned), warm="tuned"),
            Method("library provision() (warm)", "main", self.run_library, warm="tuned"),
            Method("ansible-playbook (cold)", "main", lambda: self.run_playbook_cli(provision_yml, self._cold_env())),
            Method("pdsh (ControlPersist)", "baseline", lambda: self.run_pdsh(True), warm="pdsh"),
            Method("pdsh (plain)", "baseline", lambda: self.run_pdsh(False)),
        ]
        if not self.args.no_floors:
            m += [
                Method("floor: no-task play", "floor",
                       lambda: self.run_playbook_cli(self.floor_empty, tuned, check=self._check_rc)),
                Method("floor: 1 ping task (warm)", "floor", lambda: self.run_playbook_cli(self.floor_ping, tuned),
                       warm="tuned"),
            ]
        if self.args.ref_rounds > 0:
            m += [
                Method("ref: pipelining off", "reference",
                       lambda: self.run_playbook_cli(provision_yml, self._defaults_env())),
                Method("ref: naive playbook", "reference", lambda: self._subprocess(
                    [str(ANSIBLE_PLAYBOOK), str(NAIVE_PLAYBOOK), "-i", str(self.naive_inv)],
                    self._defaults_env(), self._check_recap)),
            ]
        return m

    def keep_warm(self, group: str) -> None:
        """Reopen a group's persistent connections, unmeasured, if they may have expired (ControlPersist=120s)."""
        last = self.last_used.get(group)
        if last is not None and time.monotonic() - last < KEEP_WARM_S:
            return
        if group == "tuned":
            errors = self._subprocess([str(BIN / "ansible"), "nodes", "-i", str(self.inv), "-m", "ansible.builtin.ping"],
                                      self._env(), self._check_rc)
        else:
            errors = self.run_pdsh(True)
        if errors:
            raise BenchError(f"keep-warm of {group} connections failed: {errors}")
        self.keep_warms[group] = self.keep_warms.get(group, 0) + 1
        self.last_used[group] = time.monotonic()

    def measure(self, fn) -> dict:
        a = self.acct.snapshot()
        t0 = time.monotonic()
        try:
            errors = fn()
        except subprocess.TimeoutExpired as exc:
            errors = [f"timed out after {exc.timeout} s"]
        except Exception as exc:  # noqa: BLE001 - a crashed run is an error row, the bench goes on
            errors = [f"{type(exc).__name__}: {exc}"]
        wall = time.monotonic() - t0
        b = self.acct.snapshot()
        d = CPUAccounting.delta(a, b)
        node = d["node_cpu_s"]
        return {"wall_s": wall, "controller_cpu_s": d["controller_cpu_s"],
                "controller_cpu_rusage_s": d["controller_cpu_rusage_s"],
                "node_cpu_s_per_node": sum(node.values()) / len(node), "node_cpu_s": node,
                "total_cpu_s": d["controller_cpu_s"] + sum(node.values()), "errors": errors}

    # setup ------------------------------------------------------------------------------------

    def write_support_files(self, provisioned) -> None:
        plays = self.workdir / "plays"
        plays.mkdir(parents=True, exist_ok=True)
        self.floor_empty = plays / "floor_empty.yml"
        self.floor_empty.write_text("- name: No tasks\n  hosts: nodes\n  gather_facts: false\n  tasks: []\n")
        self.floor_ping = plays / "floor_ping.yml"
        self.floor_ping.write_text("- name: One ping per node\n  hosts: nodes\n  gather_facts: false\n  tasks:\n"
                                   "    - name: Ping\n      ansible.builtin.ping:\n")
        venvs = {n.name: n.venv for n in provisioned.nodes}
        missing = [k for k, v in venvs.items() if not v]
        if missing:
            raise BenchError(f"no venv path reported for {missing}: {provisioned.format()}")
        python = self.lock["python"]
        self.tb.write_inventory(
            self.naive_inv,
            extra_host_vars={k: {"naive_venv": v} for k, v in venvs.items()},
            extra_group_vars={"naive_pins": {k.lower(): str(v) for k, v in self.lock["packages"].items()},
                              "naive_python": f"python{python}", "naive_python_minor": str(python)})

    def listener_pids(self) -> dict[str, int]:
        return {n.name: int(n.pid_file.read_text().split()[0]) for n in self.tb.nodes}

    # the whole run ------------------------------------------------------------------------------

    def run(self) -> int:
        from llamafleet import provision
        print(f"testbed: {self.args.nodes} nodes, slot {self.args.slot}, workdir {self.workdir}", flush=True)
        t = time.monotonic()
        self.tb.up()
        print(f"  up in {time.monotonic() - t:.2f} s", flush=True)
        self.acct = CPUAccounting(self.tb.nodes, self.listener_pids(), force_proc=self.args.proc_accounting)
        print(f"CPU accounting: {self.acct.describe()}", flush=True)

        t = time.monotonic()
        first = provision(self.inv, lock_file=LIGHT_LOCK, offline=True)
        if not first.ok:
            raise BenchError("initial provision failed:\n" + first.format())
        print(f"initial provision (light lock, offline): {time.monotonic() - t:.1f} s, "
              f"changed={first.changed}, actions: {sorted({n.action for n in first.nodes})}", flush=True)
        self.write_support_files(first)

        methods = self.methods()
        runs: dict[str, list[dict]] = {m.name: [] for m in methods}
        warmup: dict[str, dict] = {}
        for rnd in range(self.args.rounds + 1):
            label = "warm-up (not counted)" if rnd == 0 else f"round {rnd}/{self.args.rounds}"
            print(f"{label}:", flush=True)
            for m in methods:
                if m.kind == "reference" and not 1 <= rnd <= self.args.ref_rounds:
                    continue
                if m.warm and rnd > 0:
                    self.keep_warm(m.warm)
                r = self.measure(m.fn)
                r["round"] = rnd
                if m.warm:
                    self.last_used[m.warm] = time.monotonic()
                (warmup.__setitem__(m.name, r) if rnd == 0 else runs[m.name].append(r))
                status = "ERROR " + " | ".join(r["errors"])[:300] if r["errors"] else "ok"
                print(f"  {m.name:27s} {r['wall_s']:7.2f} s wall  ctrl {r['controller_cpu_s']:6.2f} s  "
                      f"node {r['node_cpu_s_per_node']:5.3f} s/node  {status}", flush=True)

        profile = None
        if self.args.profile_runs > 0:
            profile = self.profile(self.args.profile_runs)
        return self.report(methods, runs, warmup, profile, first)

    def profile(self, runs: int) -> dict:
        """`runs` extra (unmeasured) warm ansible-playbook runs with the task-timing callback; medians per task."""
        profiles = []
        for _ in range(runs):
            self.keep_warm("tuned")
            profiles.append(self.profile_once())
            self.last_used["tuned"] = time.monotonic()

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None
        first = profiles[0]
        same_tasks = all([r["task"] for r in p["tasks"]] == [r["task"] for r in first["tasks"]] for p in profiles)
        rows = []
        for i, row in enumerate(first["tasks"] if same_tasks else []):
            rows.append({**row, **{k: med([p["tasks"][i][k] for p in profiles])
                                   for k in ("span_s", "host_mean_s", "host_max_s")}})
        categories: dict[str, float] = {}
        for row in rows:
            if "validate_argument_spec" in row["action"]:
                cat = "implicit role argument-spec validation tasks (every host)"
            elif set(row["statuses"]) == {"skipped"}:
                cat = "skipped tasks (a worker per host even so)"
            elif sum(row["statuses"].values()) == 1:
                cat = "run_once tasks on the controller"
            else:
                cat = "tasks that run on every node (" + row["task"].split(":")[-1].strip() + ")"
            categories[cat] = categories.get(cat, 0.0) + row["span_s"]
        return {"runs": runs, "errors": [e for p in profiles for e in p["errors"]],
                "wall_s": med([p["wall_s"] for p in profiles]), "startup_s": med([p["startup_s"] for p in profiles]),
                "after_stats_s": med([p["after_stats_s"] for p in profiles]), "tasks": rows,
                "categories_s": categories, "each_run": profiles}

    def profile_once(self) -> dict:
        self.timing_file.unlink(missing_ok=True)
        env = self._env(ANSIBLE_CALLBACK_PLUGINS=str(BENCH / "callback_plugins"),
                        ANSIBLE_CALLBACKS_ENABLED="lf_task_timing", LF_TASK_TIMING_FILE=str(self.timing_file))
        t0 = time.time()
        errors = self.run_playbook_cli(PROJECT / "provision.yml", env)
        t_end = time.time()
        events = [json.loads(line) for line in self.timing_file.read_text().splitlines()] if self.timing_file.exists() else []
        tasks: dict[str, dict] = {}
        order = []
        for ev in events:
            if ev["ev"] == "task_start":
                order.append(ev["uuid"])
                tasks[ev["uuid"]] = {"task": ev["task"], "action": ev["action"], "start": ev["t"], "end": ev["t"],
                                     "hosts": {}, "statuses": {}}
            elif ev["ev"] in ("host_start", "host_end") and ev["uuid"] in tasks:
                t = tasks[ev["uuid"]]
                h = t["hosts"].setdefault(ev["host"], [ev["t"], ev["t"]])
                if ev["ev"] == "host_end":
                    h[1] = ev["t"]
                    t["statuses"][ev["status"]] = t["statuses"].get(ev["status"], 0) + 1
                t["end"] = max(t["end"], ev["t"])
        pb_start = next((e["t"] for e in events if e["ev"] == "playbook_start"), None)
        stats = next((e["t"] for e in events if e["ev"] == "stats"), None)
        rows = []
        for i, uuid in enumerate(order):
            t = tasks[uuid]
            nxt = tasks[order[i + 1]]["start"] if i + 1 < len(order) else (stats or t["end"])
            per_host = [e - s for s, e in t["hosts"].values()]
            rows.append({"task": t["task"], "action": t["action"], "span_s": nxt - t["start"],
                         "host_mean_s": statistics.mean(per_host) if per_host else 0.0,
                         "host_max_s": max(per_host) if per_host else 0.0, "statuses": t["statuses"]})
        return {"errors": errors, "wall_s": t_end - t0,
                "startup_s": (pb_start - t0) if pb_start else None,
                "to_first_task_s": (tasks[order[0]]["start"] - t0) if order else None,
                "after_stats_s": (t_end - stats) if stats else None, "tasks": rows}

    # report -----------------------------------------------------------------------------------

    def report(self, methods, runs, warmup, profile, first) -> int:
        def med(rs, key):
            return statistics.median(r[key] for r in rs)

        def base_median(base, rounds, key="wall_s"):
            # the baseline's runs in the same rounds as the row's (references run in fewer rounds)
            return statistics.median(r[key] for r in runs[base] if r["round"] in rounds)

        cp, plain = "pdsh (ControlPersist)", "pdsh (plain)"
        summary = {}
        for m in methods:
            rs = runs[m.name]
            rounds = {r["round"] for r in rs}
            s = summary[m.name] = {
                "kind": m.kind, "warm_connections": m.warm, "runs": len(rs),
                "wall_s_median": med(rs, "wall_s"), "wall_s_min": min(r["wall_s"] for r in rs),
                "controller_cpu_s_median": med(rs, "controller_cpu_s"),
                "controller_cpu_rusage_s_median": med(rs, "controller_cpu_rusage_s"),
                "node_cpu_s_per_node_median": med(rs, "node_cpu_s_per_node"),
                "total_cpu_s_median": med(rs, "total_cpu_s"),
                "errors": sum(bool(r["errors"]) for r in rs),
            }
            s["ratio_wall_vs_pdsh_cp"] = s["wall_s_median"] / base_median(cp, rounds)
            s["ratio_wall_vs_pdsh_plain"] = s["wall_s_median"] / base_median(plain, rounds)
            b = base_median(cp, rounds, "node_cpu_s_per_node")
            s["ratio_node_cpu_vs_pdsh_cp"] = s["node_cpu_s_per_node_median"] / b if b > 0 else None
            b = base_median(plain, rounds, "node_cpu_s_per_node")
            s["ratio_node_cpu_vs_pdsh_plain"] = s["node_cpu_s_per_node_median"] / b if b > 0 else None
            s["ratio_total_cpu_vs_pdsh_cp"] = s["total_cpu_s_median"] / base_median(cp, rounds, "total_cpu_s")
            s["ratio_total_cpu_vs_pdsh_plain"] = s["total_cpu_s_median"] / base_median(plain, rounds, "total_cpu_s")
            # each run against the pdsh run of its own round
            by_round = {r["round"]: r["wall_s"] for r in runs[cp]}
            s["ratio_wall_vs_pdsh_cp_per_round"] = [r["wall_s"] / by_round[r["round"]] for r in rs]

        n = self.args.nodes
        print()
        print(f"No-op re-provision of {n} namespace nodes, {self.args.rounds} rounds ({self.args.ref_rounds} for ref: rows); "
              f"medians; ratios = median / median of pdsh in the same rounds of this run")
        print(f"CPU accounting: {self.acct.method}; keep-warm runs (unmeasured): {self.keep_warms or 'none'}")
        cols = [("method", 27), ("wall s median (min)", 19), ("ctrl CPU s", 10), ("node CPU s/node", 15),
                ("wall x pdsh(CP)", 15), ("wall x pdsh(plain)", 18), ("node CPU x pdsh(CP/plain)", 25),
                ("all CPU x pdsh(CP/plain)", 24)]
        print("| " + " | ".join(f"{c:{'<' if i == 0 else '>'}{w}s}" for i, (c, w) in enumerate(cols)) + " |")
        print("|" + "|".join("-" * (w + 2) for _, w in cols) + "|")
        for m in methods:
            s = summary[m.name]

            def fmt(x):
                return f"{x:.1f}" if x is not None else "-"
            ncr = f"{fmt(s['ratio_node_cpu_vs_pdsh_cp'])} / {fmt(s['ratio_node_cpu_vs_pdsh_plain'])}"
            tcr = f"{fmt(s['ratio_total_cpu_vs_pdsh_cp'])} / {fmt(s['ratio_total_cpu_vs_pdsh_plain'])}"
            flag = f"  ({s['errors']}/{s['runs']} runs with ERRORS)" if s["errors"] else ""
            print(f"| {m.name:27s} | {s['wall_s_median']:10.2f} ({s['wall_s_min']:6.2f}) | {s['controller_cpu_s_median']:10.2f} "
                  f"| {s['node_cpu_s_per_node_median']:15.3f} | {s['ratio_wall_vs_pdsh_cp']:15.1f} "
                  f"| {s['ratio_wall_vs_pdsh_plain']:18.1f} | {ncr:>25s} | {tcr:>24s} |{flag}")

        # The target pairs like with like: warm connections against pdsh with ControlPersist, new
        # connections against plain pdsh.
        verdicts = {}
        print()
        pairs = [("ansible-playbook (warm)", cp, "ratio_wall_vs_pdsh_cp"),
                 ("library provision() (warm)", cp, "ratio_wall_vs_pdsh_cp"),
                 ("ansible-playbook (cold)", plain, "ratio_wall_vs_pdsh_plain"),
                 ("ansible-playbook (warm)", plain, "ratio_wall_vs_pdsh_plain")]
        for name, base, key in pairs:
            ratio = summary[name][key]
            v = "PASS" if ratio <= TARGET_RATIO else "MISS"
            verdicts[f"{name} vs {base}"] = {"ratio": ratio, "verdict": v}
            print(f"target wall ratio <= {TARGET_RATIO:g}: {name} vs {base}: {ratio:.1f}x {v}")

        if profile:
            print()
            print(f"Task profile: medians of {profile['runs']} extra warm ansible-playbook runs "
                  f"({profile['wall_s']:.2f} s wall):")
            if profile["startup_s"] is not None:
                print(f"  process start -> playbook start (imports, config, inventory, collections): {profile['startup_s']:.2f} s")
            for row in profile["tasks"]:
                st = ",".join(f"{k}={v}" for k, v in sorted(row["statuses"].items()))
                print(f"  {row['span_s']:6.2f} s  {row['task'][:60]:60s} per host {row['host_mean_s']:.2f} s "
                      f"(max {row['host_max_s']:.2f})  {st}")
            if profile["after_stats_s"] is not None:
                print(f"  stats -> process exit: {profile['after_stats_s']:.2f} s")
            print("  by kind:")
            for cat, sec in sorted(profile["categories_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {sec:6.2f} s  {cat}")
            if profile["errors"]:
                print("  profile run ERRORS: " + " | ".join(profile["errors"])[:500])

        errors = {name: [r["errors"] for r in runs[name] if r["errors"]] for name in runs}
        errors = {k: v for k, v in errors.items() if v}
        if profile and profile["errors"]:
            errors["profile"] = [profile["errors"]]
        doc = {
            "benchmark": "provision_noop", "issue": 2,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
            "nodes": n, "rounds": self.args.rounds, "ref_rounds": self.args.ref_rounds,
            "keep_warm_runs": self.keep_warms, "cpu_accounting": self.acct.method,
            "cpu_accounting_description": self.acct.describe(),
            "lock": str(LIGHT_LOCK.relative_to(PROJECT)), "target_ratio": TARGET_RATIO,
            "ansible_version": subprocess.run([str(BIN / "ansible"), "--version"], capture_output=True,
                                              text=True).stdout.splitlines()[0],
            "initial_provision": {"changed": first.changed, "actions": [nd.action for nd in first.nodes]},
            "summary": summary, "verdicts": verdicts, "runs": runs, "warmup": warmup, "profile": profile,
            "errors": errors, "warnings": self.warnings,
        }
        out_dir = BENCH / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"provision_noop-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults: {out}")
        if errors:
            print(f"ERRORS in: {', '.join(errors)}", file=sys.stderr)
            return 1
        return 0

    def teardown(self) -> None:
        if self.pdsh_cp_dir.exists():
            for sock in self.pdsh_cp_dir.iterdir():  # close pdsh's ControlMasters before the nodes go
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=10)
        try:
            self.tb.down()
        finally:
            if self.acct is not None:
                self.acct.cleanup()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slot", type=int, default=2, help="testbed slot (1 and 9 belong to the test suite)")
    p.add_argument("--workdir", help="default: a new directory under /tmp, removed at the end")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--ref-rounds", type=int, default=2,
                   help="rounds that also run the plain-default Ansible reference rows (slow; 0 = none)")
    p.add_argument("--no-floors", action="store_true", help="skip the floor rows (no-task play, 1 ping task)")
    p.add_argument("--profile-runs", type=int, default=3, help="extra warm runs profiled per task (0 = none)")
    p.add_argument("--proc-accounting", action="store_true", help="use the /proc fallback even where cgroup v2 works")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.ref_rounds = max(0, min(args.ref_rounds, args.rounds))
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, cgroups)", file=sys.stderr)
        return 2
    for tool in ("pdsh", "rsync", "ip", "unshare"):
        if not shutil.which(tool):
            print(f"needs {tool} (make setup)", file=sys.stderr)
            return 2
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="lfbench-noop-")
    # SIGTERM ends the run like Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: tearing the testbed down", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
        try:
            bench.teardown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if own_workdir and not args.keep_workdir:
                shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
