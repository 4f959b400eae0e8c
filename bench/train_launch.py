#!/usr/bin/env python3
"""Benchmark (issue 3): launch latency of a training run on N namespace nodes against pdsh starting the
same scripts, in the same run; and an unchanged re-sync of a 200 MB dataset against a raw parallel rsync.

    .venv/bin/python bench/train_launch.py [--nodes 8] [--rounds 3] [--stack-root DIR] [--slot 5]

Setup: a testbed (tests/testbed.py: one netns + real sshd per node, slot 5). The nodes need the real
default stack (torch, llamafactory, deepspeed): ONE node is provisioned for real (offline, the default
lock; or --stack-root names a llamafleet root that already holds it, provisioned there first if it
does not), and every node gets that venv by a hard-link copy (`cp -al <root>/stacks <node root>/stacks`;
a venv's scripts point at the source venv's interpreter, which exists on this shared filesystem).
`llamafleet.check` must then pass on every node (parity compares versions). The job is
examples/tiny with max_steps 2000 (the run keeps going while it is measured), its model built with
the stack's python (python/llamafleet/tinymodel.py).

1. Launch latency, a warm-up round (not counted) then --rounds rounds of, in this order:
     llamafleet train()   t0 just before `llamafleet.train(inv, job, replace=True)`; end = the moment every
                          node has a live rank process: a process whose environ carries that run's
                          LLAMAFLEET_RUN_ID and whose argv is the job's command (llamafactory-cli), found by
                          scanning /proc every --poll-ms (50) from a thread of this process; also when
                          train() returned. Then llamafleet.stop(inv, run_id); no process of the run may
                          remain (/proc/*/environ scanned).
     pdsh (ControlPersist) `pdsh -R ssh -w IP,... 'cd <nodes dir>/"$HOSTNAME"/runs/<run id> && { setsid nohup
                          sh launch.sh >pdsh.log 2>&1 </dev/null & }'`: the very launch.sh scripts llamafleet
                          wrote in this round, PDSH_SSH_ARGS_APPEND = the inventory's ssh options +
                          ControlMaster=auto ControlPersist=120s like ansible.cfg; same end condition; then
                          every process carrying the run id (and its process group) is killed here.
     pdsh (plain)         the same with ControlMaster=no: one new SSH connection per node.
     floor: ansible-playbook, 1 task
                          `ansible-playbook bench/floor_launch.yml`: one ansible.builtin.shell task per node
                          starting the same launch.sh (setsid), llamafleet's ansible.cfg, warm connections:
                          the least any launch through ansible-playbook costs on these nodes.
   Each rank process is frozen (SIGSTOP) the moment it is seen and continued (SIGCONT) before the stop
   (--no-freeze: left running): the nodes share this machine's cores, and 8 ranks importing torch would
   otherwise slow down the launch on the nodes not reached yet, the slower launcher the more.
   Ratio = median(llamafleet) / median(pdsh) over the same rounds. A task profile of every measured
   train() comes from its own on_event callback (times taken when each event reaches this process).
2. Re-sync of an unchanged --dataset-mb (200) MB dataset (a deterministic alpaca jsonl referenced by the
   job's dataset_info.json): train(dry_run=True) stages the inputs; `rsync --dry-run --stats` with
   llamafleet's own argv (the `rsync_argv` filter of the sync task, the node's hostvars) counts what
   the first copy moves; a real train() does the first copy (its sync task timed from its events), then
   is stopped; a second train() on the unchanged inputs (its sync task: changed or not, span); then
   --rounds rounds of: llamafleet's argv + --stats on every node in parallel (file data moved = sum of
   "Total transferred file size", wall) and the baseline, 8 parallel `rsync -a --stats` with the same
   ssh options to <root>/rawsync-<job> (its first copy before the rounds).
3. Prints a table, writes bench/results/train_launch-<date>.json. Always tears down (try/finally, Ctrl-C and
   SIGTERM included): every run started here stopped, the testbed down, the cgroups removed.
Targets: launch <= 3x pdsh (ControlPersist); an unchanged re-sync moves no file data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROJECT = pathlib.Path(__file__).resolve().parents[1]
BENCH = PROJECT / "bench"
TINY = PROJECT / "examples" / "tiny"
TINYMODEL = PROJECT / "python" / "llamafleet" / "tinymodel.py"
TARGET_LAUNCH_RATIO = 3.0
TARGET_FLOOR_RATIO = 1.3  # issue 13: the launch against the one-task ansible-playbook floor of the same run
KEEP_WARM_S = 90.0  # ControlPersist is 120 s for both Ansible and pdsh: reopen connections older than this
MARKER = b"LLAMAFLEET_RUN_ID="
RANK_COMMAND = b"llamafactory-cli"  # the job's command (launcher torchrun): argv of a rank's process
CLK_TCK = os.sysconf("SC_CLK_TCK")
LF, PDSH_CP, PDSH_PLAIN = "llamafleet train()", "pdsh (ControlPersist)", "pdsh (plain)"
FLOOR = "floor: ansible-playbook, 1 task"
STATS = {
    "files_transferred": re.compile(r"^Number of regular files transferred: ([\d,]+)", re.M),
    "total_file_size": re.compile(r"^Total file size: ([\d,]+) bytes", re.M),
    "transferred_file_size": re.compile(r"^Total transferred file size: ([\d,]+) bytes", re.M),
    "literal_data": re.compile(r"^Literal data: ([\d,]+) bytes", re.M),
    "bytes_sent": re.compile(r"^Total bytes sent: ([\d,]+)", re.M),
    "bytes_received": re.compile(r"^Total bytes received: ([\d,]+)", re.M),
}

sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(BENCH))

from testbed import Testbed  # noqa: E402

import yaml  # noqa: E402

try:  # the colleague's cgroup v2 accounting (bench/provision_noop.py); the launch times do not need it
    from provision_noop import CPUAccounting  # noqa: E402
except Exception:  # noqa: BLE001
    CPUAccounting = None

BIN = pathlib.Path(sys.executable).parent


class BenchError(Exception):
    pass


def _load_rsync_argv():
    sys.path.insert(0, str(PROJECT / "collections"))  # the filter imports the collection's plugin_utils
    from ansible_collections.llamafleet.cluster.plugins.filter.transfer import rsync_argv as argv

    return argv


rsync_argv = _load_rsync_argv()


# -- /proc -------------------------------------------------------------------------------------------

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    try:
        return raw.decode().rsplit(")", 1)[1].split()
    except IndexError:
        return None


def _alive(fields: list[str] | None) -> bool:
    return bool(fields) and fields[0] not in ("Z", "X")


def marked_processes(run_id: str | None = None) -> dict[int, str]:
    """pid -> run id of every live process whose environment carries LLAMAFLEET_RUN_ID (that run's only)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        env = _read(f"/proc/{entry}/environ")
        if not env or MARKER not in env:
            continue
        for var in env.split(b"\0"):
            if var.startswith(MARKER):
                rid = var[len(MARKER):].decode(errors="replace")
                if (run_id is None or rid == run_id) and _alive(_stat_fields(int(entry))):
                    found[int(entry)] = rid
                break
    return found


class RankWatch(threading.Thread):
    """Scans /proc every `interval` s for rank processes (LLAMAFLEET_RUN_ID in environ + the job's command in
    argv) in the testbed's network namespaces; records when each node's first one was seen (monotonic), and
    its start time from /proc/<pid>/stat. Done when every node has one of the same run id."""

    def __init__(self, netns_inodes: dict[int, str], interval: float, timeout: float, run_id: str | None = None,
                 freeze: bool = False):
        super().__init__(daemon=True)
        self.freeze = freeze
        self.frozen: list[int] = []
        self.ns = netns_inodes
        self.nodes = set(netns_inodes.values())
        self.interval = interval
        self.timeout = timeout
        self.run_id = run_id
        self.seen: dict[str, dict[str, float]] = {}  # run id -> node -> monotonic time first seen
        self.started: dict[str, dict[str, float]] = {}  # run id -> node -> process start (monotonic)
        self.done_at: float | None = None
        self.done_run: str | None = None
        self.scans = 0
        self.scan_s: list[float] = []
        self.cpu_s = 0.0
        self._halt = threading.Event()
        self._ready = threading.Event()
        # /proc/<pid>/stat starttime counts from boot (CLOCK_BOOTTIME): its offset to monotonic
        self._boot_to_mono = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def thaw(self) -> None:
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass

    def start(self) -> None:
        super().start()
        self._ready.wait(timeout=10)

    def _scan(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            # one stat first: only processes in the testbed's namespaces have their environment read
            try:
                node = self.ns.get(os.stat(f"/proc/{entry}/ns/net").st_ino)
            except OSError:
                continue
            if node is None:
                continue
            env = _read(f"/proc/{entry}/environ")
            if not env or MARKER not in env:
                continue
            t = time.monotonic()
            rid = next((v[len(MARKER):].decode(errors="replace") for v in env.split(b"\0") if v.startswith(MARKER)), None)
            if rid is None or (self.run_id and rid != self.run_id) or node in self.seen.get(rid, {}):
                continue
            cmd = _read(f"/proc/{entry}/cmdline") or b""
            if not any(a.endswith(RANK_COMMAND) for a in cmd.split(b"\0")):
                continue
            fields = _stat_fields(int(entry))
            if not _alive(fields):
                continue
            self.seen.setdefault(rid, {})[node] = t
            self.started.setdefault(rid, {})[node] = int(fields[19]) / CLK_TCK - self._boot_to_mono
            if self.freeze:  # --freeze-ranks: the rank's start-up must not slow the other nodes' launch (2 cores)
                try:
                    os.kill(int(entry), signal.SIGSTOP)
                    self.frozen.append(int(entry))
                except OSError:
                    pass
            if len(self.seen[rid]) == len(self.nodes) and self.done_at is None:
                self.done_at, self.done_run = t, rid

    def run(self) -> None:
        c0 = time.thread_time()
        deadline = time.monotonic() + self.timeout
        self._ready.set()
        while not self._halt.is_set() and self.done_at is None and time.monotonic() < deadline:
            t = time.monotonic()
            self._scan()
            self.scans += 1
            self.scan_s.append(time.monotonic() - t)
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - t)))
        self.cpu_s = time.thread_time() - c0

    def wait(self) -> None:
        self.join(timeout=self.timeout + 10)


# -- the benchmark -----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = pathlib.Path(args.workdir).resolve()
        self.tb = Testbed(self.workdir / "testbed", nodes=args.nodes, slot=args.slot)
        self.inv = self.tb.inventory_path
        self.nodes_dir = self.workdir / "testbed" / "nodes"
        self.state = self.workdir / "state"
        self.job = self.workdir / "job"
        self.pdsh_cp_dir = self.workdir / "cp-pdsh"
        self.acct = None
        self.netns: dict[int, str] = {}
        self.runs_started: set[str] = set()
        self.last_used: dict[str, float] = {}
        self.keep_warms: dict[str, int] = {}
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.doc: dict = {}

    # helpers ----------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"  warning: {msg}", flush=True)

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"  ERROR: {msg}", flush=True)

    def _pdsh_env(self, persist: bool) -> dict[str, str]:
        opts = list(self.tb.ssh_args())
        if persist:  # like ansible.cfg's ssh_args
            opts += ["-o", "ControlMaster=auto", "-o", "ControlPersist=120s", "-o", "ServerAliveInterval=15",
                     "-o", f"ControlPath={self.pdsh_cp_dir}/%C"]
        else:
            opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ServerAliveInterval=15"]
        return {**os.environ, "PDSH_SSH_ARGS_APPEND": " ".join(opts)}

    def _pdsh(self, command: str, persist: bool, timeout: float = 120) -> subprocess.CompletedProcess:
        ips = ",".join(n.ip for n in self.tb.nodes)
        argv = ["pdsh", "-S", "-R", "ssh", "-f", str(max(32, len(self.tb.nodes))), "-w", ips, command]
        return subprocess.run(argv, env=self._pdsh_env(persist), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def _ansible_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["ANSIBLE_CONFIG"] = str(PROJECT / "ansible.cfg")
        return env

    def keep_warm(self, group: str) -> None:
        """Reopen a group's persistent connections, unmeasured, if they may have expired (ControlPersist=120s)."""
        last = self.last_used.get(group)
        if last is not None and time.monotonic() - last < KEEP_WARM_S:
            return
        if group == "ansible":
            proc = subprocess.run([str(BIN / "ansible"), "nodes", "-i", str(self.inv), "-m", "ansible.builtin.ping"],
                                  cwd=PROJECT, env=self._ansible_env(), capture_output=True, text=True, timeout=300)
        else:
            proc = self._pdsh("true", persist=True)
        if proc.returncode != 0:
            raise BenchError(f"keep-warm of the {group} connections failed: {(proc.stdout + proc.stderr)[-800:]}")
        self.keep_warms[group] = self.keep_warms.get(group, 0) + 1
        self.last_used[group] = time.monotonic()

    def kill_run(self, run_id: str, grace: float = 20.0) -> int:
        """TERM (then KILL) every process carrying the run id, and the process groups they are in. Returns the
        number of processes found. Only processes of runs this benchmark started are ever signalled."""
        assert run_id in self.runs_started
        procs = marked_processes(run_id)
        if not procs:
            return 0
        own = os.getpgrp()
        groups = set()
        for pid in procs:
            try:
                g = os.getpgid(pid)
            except OSError:
                continue
            if g > 1 and g != own:
                groups.add(g)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            for s in (sig, signal.SIGCONT):  # a stopped process (--freeze-ranks) acts on TERM once continued
                for g in groups:
                    try:
                        os.killpg(g, s)
                    except OSError:
                        pass
                for pid in procs:
                    try:
                        os.kill(pid, s)
                    except OSError:
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not marked_processes(run_id):
                    return len(procs)
                time.sleep(0.1)
            procs = marked_processes(run_id)
        return len(procs)

    def verify_gone(self, run_id: str, what: str) -> list[int]:
        """No live process may carry the run id; waits up to 5 s for exits to settle."""
        deadline = time.monotonic() + 5
        while True:
            left = marked_processes(run_id)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if left:
            self.error(f"{what}: {len(left)} process(es) of run {run_id} still alive: {sorted(left)[:10]}; killing them")
            self.kill_run(run_id)
        return sorted(left)

    def cpu_snapshot(self):
        return self.acct.snapshot() if self.acct else None

    def cpu_delta(self, a, b) -> dict:
        if not (a and b):
            return {}
        d = CPUAccounting.delta(a, b)
        node = d["node_cpu_s"]
        return {"controller_cpu_s": d["controller_cpu_s"], "node_cpu_s_per_node": sum(node.values()) / len(node)}

    # setup ------------------------------------------------------------------------------------------

    def setup_stack(self) -> dict:
        """One node's stack provisioned for real (or found in --stack-root), hard-linked to every node."""
        from llamafleet import check, provision
        info: dict = {}
        src_root = pathlib.Path(self.args.stack_root).resolve() if self.args.stack_root else self.tb.nodes[0].root
        if not (src_root / "stacks" / "current").exists():
            inv1 = self.workdir / "inventory-provision.yml"
            self.tb.write_inventory(inv1, nodes=["node1"], extra_host_vars={"node1": {"llamafleet_root": str(src_root)}})
            self.log(f"provisioning the default stack for real on node1 (offline; root {src_root}); takes minutes ...")
            t = time.monotonic()
            # the default state dir: the controller's wheelhouse of the default lock is kept there
            saved = os.environ.pop("LLAMAFLEET_STATE_DIR", None)
            try:
                res = provision(inv1, offline=True)
            finally:
                if saved is not None:
                    os.environ["LLAMAFLEET_STATE_DIR"] = saved
            info["provision_s"] = time.monotonic() - t
            info["provision"] = res.format()
            if not res.ok:
                raise BenchError("provisioning node1 failed:\n" + res.format())
            self.log(f"  provisioned in {info['provision_s']:.0f} s: {[n.action for n in res.nodes]}")
        else:
            self.log(f"stack: reusing {src_root}/stacks ({os.readlink(src_root / 'stacks' / 'current')})")
        info["source_root"] = str(src_root)
        info["stack"] = os.readlink(src_root / "stacks" / "current")
        t = time.monotonic()
        for n in self.tb.nodes:
            if n.root.resolve() == src_root:
                continue
            if (n.root / "stacks").exists():
                shutil.rmtree(n.root / "stacks")
            n.root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-al", str(src_root / "stacks"), str(n.root / "stacks")], check=True)
        info["hardlink_copy_s"] = time.monotonic() - t
        self.log(f"  `cp -al <root>/stacks` to {len(self.tb.nodes)} node roots: {info['hardlink_copy_s']:.1f} s")
        t = time.monotonic()
        res = check(self.inv)
        info["check_s"] = time.monotonic() - t
        info["check"] = res.format()
        if not res.ok:
            raise BenchError("llamafleet.check failed on the hard-linked stacks:\n" + res.format())
        self.log(f"  llamafleet.check: OK on {len(res.nodes)} nodes, parity "
                 f"{'OK' if res.parity and res.parity.ok else '?'} ({info['check_s']:.1f} s)")
        self.last_used["ansible"] = time.monotonic()
        self.stack_python = src_root / "stacks" / "current" / "bin" / "python"
        return info

    def setup_job(self) -> None:
        shutil.copytree(TINY, self.job, ignore=shutil.ignore_patterns("model", "saves", "__pycache__"))
        base = yaml.safe_load((TINY / "sft_lora.yaml").read_text())
        # the job is laid out on its own: its paths are relative to it (train(..., workdir=self.job))
        base.update(model_name_or_path="model", dataset_dir="data", max_steps=self.args.max_steps)
        self.launch_yaml = self.job / "lfbench_launch.yaml"
        self.launch_yaml.write_text(yaml.safe_dump(base, sort_keys=False))
        t = time.monotonic()
        subprocess.run([str(self.stack_python), str(TINYMODEL), str(self.job / "model"),
                        "--data", str(self.job / "data" / "tiny_alpaca.jsonl")], check=True, capture_output=True)
        self.log(f"job {self.job} (max_steps {self.args.max_steps}), model built in {time.monotonic() - t:.1f} s")

    def write_dataset(self) -> dict:
        """A deterministic alpaca jsonl of --dataset-mb MB (10^6 bytes), referenced by dataset_info.json."""
        target = int(self.args.dataset_mb * 1_000_000)
        path = self.job / "data" / "bench_alpaca.jsonl"
        rng = random.Random(3)
        words = ["apple", "river", "cloud", "stone", "garden", "pencil", "window", "rocket", "forest", "candle",
                 "bridge", "tiger", "planet", "button", "silver", "ladder", "meadow", "copper", "harbor", "violet"]
        phrases = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))) for _ in range(4096)]
        t = time.monotonic()
        size, i = 0, 0
        with open(path, "w") as fh:
            while size < target:
                chunk = []
                for _ in range(500):
                    a, b = phrases[(i * 7919) % 4096], phrases[(i * 104729 + 17) % 4096]
                    line = json.dumps({"instruction": f"Record {i}: repeat the words in reverse order.",
                                       "input": a, "output": " ".join(reversed(a.split())) + ". " + b}) + "\n"
                    chunk.append(line)
                    i += 1
                text = "".join(chunk)
                fh.write(text)
                size += len(text.encode())
        info = json.loads((self.job / "data" / "dataset_info.json").read_text())
        info["bench_alpaca"] = {"file_name": "bench_alpaca.jsonl", "formatting": "alpaca",
                                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
        (self.job / "data" / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        cfg = yaml.safe_load(self.launch_yaml.read_text())
        cfg["dataset"] = "bench_alpaca"
        self.resync_yaml = self.job / "lfbench_resync.yaml"
        self.resync_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = {"path": str(path), "bytes": path.stat().st_size, "records": i, "write_s": time.monotonic() - t}
        self.log(f"dataset {path.name}: {out['bytes'] / 1e6:.1f} MB, {i} records ({out['write_s']:.1f} s)")
        return out

    def setup_pdsh(self) -> None:
        """The pdsh launch names each node's run dir by its hostname ($HOSTNAME = the node's name here)."""
        self.pdsh_cp_dir.mkdir(parents=True, exist_ok=True)
        proc = self._pdsh('echo "$HOSTNAME"', persist=True)
        got = {}
        for line in proc.stdout.splitlines():
            ip, _, name = line.partition(": ")
            got[ip.strip()] = name.strip()
        want = {n.ip: n.name for n in self.tb.nodes}
        if proc.returncode != 0 or got != want:
            raise BenchError(f"pdsh: $HOSTNAME is not each node's name: {got} (rc {proc.returncode}, {proc.stderr[-400:]})")
        self.last_used["pdsh"] = time.monotonic()

    # 1. launch latency --------------------------------------------------------------------------------

    def _watch(self, run_id=None) -> RankWatch:
        w = RankWatch(self.netns, self.args.poll_ms / 1000, self.args.launch_timeout, run_id,
                      freeze=not self.args.no_freeze)
        w.start()
        return w

    def launch_llamafleet(self) -> tuple[dict, str | None]:
        from llamafleet import stop, train
        self.keep_warm("ansible")
        events: list[tuple[float, str, str, str]] = []

        def on_event(ev):
            events.append((time.monotonic(), ev.host, ev.task, ev.status))
        watch = self._watch()
        a = self.cpu_snapshot()
        t0, t0_wall = time.monotonic(), time.time()
        try:
            res = train(self.inv, self.launch_yaml, workdir=self.job, replace=True, on_event=on_event)
        finally:
            t_ret = time.monotonic()
            b = self.cpu_snapshot()
        if res.run_id:
            self.runs_started.add(res.run_id)
        r = {"ok": res.ok, "run_id": res.run_id, "train_return_s": t_ret - t0, "errors": list(res.errors)}
        if res.ok:
            watch.wait()
        watch.stop()
        r.update(self._watch_result(watch, t0, res.run_id))
        r.update(self.cpu_delta(a, b))
        if "controller_cpu_s" in r:
            r["controller_cpu_s"] -= watch.cpu_s  # the /proc poller is this process's, not llamafleet's
        r["profile"] = profile(events, t0, watch.done_at, t_ret)
        if res.run_id:
            r["profile"]["node_s"] = self.node_timings(res.run_id, t0_wall)
        if not res.ok:
            self.error(f"train() failed: {res.format()[-1500:]}")
        watch.thaw()  # stopped processes must run to act on llamafleet's TERM
        if res.run_id:
            t = time.monotonic()
            st = stop(self.inv, res.run_id)
            r["stop_s"] = time.monotonic() - t
            r["stop_states"] = {n.name: n.state for n in st.nodes}
            self.last_used["ansible"] = time.monotonic()
            r["left_after_stop"] = self.verify_gone(res.run_id, "llamafleet.stop")
        return r, res.run_id if res.ok else None

    def node_timings(self, run_id: str, t0_wall: float) -> dict:
        """Inside the start task, per node (the module's own record, start_timings.json in the run directory; the
        nodes share this machine's clock): seconds from the command's start to the module running, its check
        done, the all-or-nothing answer, the supervisor up. Median and max over the nodes."""
        per: dict[str, list[float]] = {}
        for node in (n.name for n in self.tb.nodes):
            try:
                times = json.loads((self.nodes_dir / node / "runs" / run_id / "start_timings.json").read_text())
            except (OSError, ValueError):
                continue
            for k, v in times.items():
                per.setdefault(k, []).append(v - t0_wall)
        return {k: {"median": statistics.median(v), "max": max(v), "nodes": len(v)} for k, v in per.items()}

    def _floor(self, run_id: str, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [str(BIN / "ansible-playbook"), str(BENCH / "floor_launch.yml"), "-i", str(self.inv),
                "-e", json.dumps({"floor_run_id": run_id})]
        return subprocess.run(argv, cwd=PROJECT, env=self._ansible_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def launch_pdsh(self, run_id: str, persist: bool, floor: bool = False) -> dict:
        """pdsh starting launch.sh on every node; ``floor``: ansible-playbook with one task doing the same."""
        if floor:
            self.keep_warm("ansible")
        elif persist:
            self.keep_warm("pdsh")
        rdir = f"{shlex.quote(str(self.nodes_dir))}/\"$HOSTNAME\"/runs/{shlex.quote(run_id)}"
        # only the setsid command goes to the background, its output redirected: the remote shell exits at once
        # and the SSH session ends (backgrounding `cd && ...` as a whole would keep the session's stdout open)
        cmd = f"cd {rdir} && {{ setsid nohup sh launch.sh >pdsh.log 2>&1 </dev/null & }}"
        watch = self._watch(run_id)
        a = self.cpu_snapshot()
        t0 = time.monotonic()
        try:
            proc = self._floor(run_id) if floor else self._pdsh(cmd, persist)
        except subprocess.TimeoutExpired as exc:
            proc = subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout or ""), f"timed out after {exc.timeout} s")
        t_ret = time.monotonic()
        b = self.cpu_snapshot()
        if floor:
            self.last_used["ansible"] = time.monotonic()
        elif persist:
            self.last_used["pdsh"] = time.monotonic()
        r = {"ok": proc.returncode == 0, "run_id": run_id, "pdsh_return_s": t_ret - t0,
             "command": "ansible-playbook bench/floor_launch.yml" if floor else cmd, "errors": []}
        if proc.returncode != 0:
            r["errors"].append(f"{'ansible-playbook' if floor else 'pdsh'} rc {proc.returncode}: "
                               f"{(proc.stdout + proc.stderr)[-800:]}")
        elif not floor and (proc.stdout + proc.stderr).strip():
            self.warn(f"pdsh printed (rc 0): {(proc.stdout + proc.stderr).strip()[-300:]}")
        if r["ok"]:
            watch.wait()
        watch.stop()
        r.update(self._watch_result(watch, t0, run_id))
        r.update(self.cpu_delta(a, b))
        if "controller_cpu_s" in r:
            r["controller_cpu_s"] -= watch.cpu_s
        watch.thaw()
        t = time.monotonic()
        r["killed"] = self.kill_run(run_id)
        r["kill_s"] = time.monotonic() - t
        r["left_after_kill"] = self.verify_gone(run_id, "kill by marker")
        for e in r["errors"]:
            self.error(e)
        return r

    def _watch_result(self, w: RankWatch, t0: float, run_id: str | None) -> dict:
        seen = w.seen.get(run_id or "", {})
        started = w.started.get(run_id or "", {})
        r = {"poll_scans": w.scans, "poll_scan_ms_median": 1000 * statistics.median(w.scan_s) if w.scan_s else None,
             "poller_cpu_s": w.cpu_s,
             "node_seen_s": {k: v - t0 for k, v in sorted(seen.items())},
             "node_proc_start_s": {k: v - t0 for k, v in sorted(started.items())}}
        if w.done_at is not None and w.done_run == run_id:
            r["launch_s"] = w.done_at - t0
            r["launch_proc_start_s"] = max(started.values()) - t0
            r["first_node_s"] = min(seen.values()) - t0
        else:
            r["launch_s"] = None
            r["errors_watch"] = f"only {len(seen)}/{len(self.netns)} nodes had a rank process of run {run_id} " \
                                f"within {self.args.launch_timeout:g} s"
            self.error(r["errors_watch"])
        return r

    def launch_rounds(self) -> dict:
        runs = {LF: [], PDSH_CP: [], PDSH_PLAIN: [], FLOOR: []}
        warmup = {}
        for rnd in range(self.args.rounds + 1):
            label = "warm-up (not counted)" if rnd == 0 else f"round {rnd}/{self.args.rounds}"
            self.log(f"{label}:")
            r, run_id = self.launch_llamafleet()
            self._record(rnd, LF, r, runs, warmup)
            if run_id and r.get("launch_s") is not None:
                self._record(rnd, PDSH_CP, self.launch_pdsh(run_id, persist=True), runs, warmup)
                if not self.args.no_plain_pdsh:
                    self._record(rnd, PDSH_PLAIN, self.launch_pdsh(run_id, persist=False), runs, warmup)
                if not self.args.no_floor:
                    self._record(rnd, FLOOR, self.launch_pdsh(run_id, persist=True, floor=True), runs, warmup)
        return {"runs": runs, "warmup": warmup}

    def _record(self, rnd, name, row, runs, warmup) -> None:
        row["round"] = rnd
        (warmup.__setitem__(name, row) if rnd == 0 else runs[name].append(row))
        ls = f"{row['launch_s']:6.2f} s" if row.get("launch_s") is not None else "   --- "
        extra = f"train() returned {row['train_return_s']:5.2f} s, stop {row.get('stop_s', 0):5.2f} s" \
            if name == LF else f"pdsh returned {row['pdsh_return_s']:5.2f} s"
        cpu = f", ctrl CPU {row['controller_cpu_s']:5.2f} s" if "controller_cpu_s" in row else ""
        self.log(f"  {name:22s} all ranks running {ls} (first node {row.get('first_node_s') or 0:5.2f} s), "
                 f"{extra}{cpu}{'  ERRORS' if row['errors'] else ''}")

    # 2. re-sync --------------------------------------------------------------------------------------

    def _hostvars(self) -> dict[str, dict]:
        doc = yaml.safe_load(self.inv.read_text())
        group = doc["all"]["children"]["nodes"]
        return {name: {**group["vars"], **hv, "inventory_hostname": name} for name, hv in group["hosts"].items()}

    def _parallel_rsync(self, argvs: dict[str, list[str]]) -> dict:
        t0 = time.monotonic()
        procs = {n: subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for n, a in argvs.items()}
        outs = {n: p.communicate(timeout=900)[0] for n, p in procs.items()}
        wall = time.monotonic() - t0
        per = {}
        for n, out in outs.items():
            s = {k: int(m.group(1).replace(",", "")) if (m := rx.search(out)) else None for k, rx in STATS.items()}
            items = [m.group(0) for m in re.finditer(r"^[<>ch.*][fdLDS][.+?cstpoguaxn ]{9,} .*$", out, re.M)]
            s["itemized_lines"] = len(items)
            s["itemized_sample"] = items[:6]
            s["rc"] = procs[n].returncode
            if procs[n].returncode != 0:
                s["output_tail"] = out[-800:]
            per[n] = s
        total = {k: sum((p[k] or 0) for p in per.values()) for k in list(STATS) + ["itemized_lines"]}
        return {"wall_s": wall, "total": total, "nodes": per, "ok": all(p["rc"] == 0 for p in per.values())}

    def resync(self) -> dict:
        from llamafleet import train
        out: dict = {"dataset": self.write_dataset()}
        dry = train(self.inv, self.resync_yaml, workdir=self.job, dry_run=True)
        if not dry.ok:
            raise BenchError("train(dry_run=True) of the re-sync job failed:\n" + dry.format())
        plan = dry.plan
        stage = plan["stage_dir"]
        job = plan["job"]
        out["job"] = job
        out["stage_dir"] = stage
        out["stage_bytes"] = sum(p.stat().st_size for p in pathlib.Path(stage).rglob("*") if p.is_file())
        hv = self._hostvars()
        lf_argv = {n: rsync_argv(hv[n], stage, plan["nodes"][n]["inputs_dir"]) + ["--stats"] for n in hv}
        # the baseline: plain `rsync -a --stats` through the very same ssh command, to a directory of its own
        raw_argv = {}
        for n, a in lf_argv.items():
            ssh_cmd = a[a.index("-e") + 1]
            raw_argv[n] = ["rsync", "-a", "--stats", "-e", ssh_cmd, stage.rstrip("/") + "/",
                           f"{hv[n]['ansible_user']}@{hv[n]['ansible_host']}:{hv[n]['llamafleet_root']}/rawsync-{job}/"]
        out["llamafleet_argv_node1"] = lf_argv[self.tb.nodes[0].name]
        out["raw_argv_node1"] = raw_argv[self.tb.nodes[0].name]

        # what the first copy moves, counted by llamafleet's own argv (rsync --dry-run changes nothing)
        out["first_copy_dry_run_llamafleet"] = self._parallel_rsync({n: a[:1] + ["--dry-run"] + a[1:]
                                                                     for n, a in lf_argv.items()})
        # the first copy, by a real train() (its sync task), then stopped
        out["first_sync_train"] = self._train_for_sync("first copy")
        out["unchanged_train"] = self._train_for_sync("unchanged")
        # the baseline's first copy
        out["first_copy_raw"] = self._parallel_rsync(raw_argv)
        self.log(f"  raw rsync first copy: {out['first_copy_raw']['wall_s']:.2f} s, "
                 f"{out['first_copy_raw']['total']['transferred_file_size'] / 1e6:.1f} MB of file data")
        rounds = {"llamafleet rsync argv": [], "raw parallel rsync": []}
        for rnd in range(1, self.args.rounds + 1):
            # as every train() does, plan again first: make_plan rebuilds the stage (hard links, same files and
            # mtimes, new directories); not measured
            again = train(self.inv, self.resync_yaml, workdir=self.job, dry_run=True)
            if not again.ok or again.plan["stage_dir"] != stage:
                raise BenchError("train(dry_run=True) of the re-sync job failed:\n" + again.format())
            order = (("llamafleet rsync argv", lf_argv), ("raw parallel rsync", raw_argv))
            for name, argvs in (order if rnd % 2 else order[::-1]):  # alternate which goes first
                r = self._parallel_rsync(argvs)
                r["round"] = rnd
                rounds[name].append(r)
                if not r["ok"]:
                    self.error(f"{name} round {rnd} failed: {[p.get('output_tail') for p in r['nodes'].values()]}")
                self.log(f"  unchanged re-sync {rnd}: {name:22s} {r['wall_s']:5.2f} s, file data moved "
                         f"{r['total']['transferred_file_size']} B, files {r['total']['files_transferred']}, "
                         f"itemized lines {r['total']['itemized_lines']}")
        out["unchanged_rounds"] = rounds
        return out

    def _train_for_sync(self, label: str) -> dict:
        from llamafleet import stop, train
        self.keep_warm("ansible")
        events: list = []
        t0 = time.monotonic()
        res = train(self.inv, self.resync_yaml, workdir=self.job, replace=True,
                    on_event=lambda ev: events.append((time.monotonic(), ev.host, ev.task, ev.status)))
        wall = time.monotonic() - t0
        if res.run_id:
            self.runs_started.add(res.run_id)
        prof = profile(events, t0, None, t0 + wall)
        sync = next((row for row in prof["tasks"] if row["task"].startswith("Sync the run's inputs")), None)
        prepared = next((row for row in prof["tasks"] if row["task"].startswith("Check the node before")), None)
        r = {"ok": res.ok, "run_id": res.run_id, "train_return_s": wall, "errors": list(res.errors),
             "sync_task": sync, "prepared_task": prepared, "profile": prof}
        if not res.ok:
            self.error(f"train() of the re-sync job ({label}) failed: {res.format()[-1500:]}")
        if res.run_id:
            st = stop(self.inv, res.run_id)
            r["stop_states"] = {n.name: n.state for n in st.nodes}
            self.last_used["ansible"] = time.monotonic()
            r["left_after_stop"] = self.verify_gone(res.run_id, "llamafleet.stop")
        if sync:
            self.log(f"  train() ({label}): {wall:.2f} s; its sync task {sync['span_s']:.2f} s, statuses "
                     f"{sync['statuses']}; prepared (inputs sha256) task {prepared['span_s'] if prepared else 0:.2f} s")
        return r

    # the whole run -------------------------------------------------------------------------------------

    def run(self) -> int:
        from llamafleet import __version__
        os.environ["LLAMAFLEET_STATE_DIR"] = str(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.log(f"testbed: {self.args.nodes} nodes, slot {self.args.slot}, workdir {self.workdir}")
        t = time.monotonic()
        self.tb.up()
        self.log(f"  up in {time.monotonic() - t:.2f} s")
        self.netns = {os.stat(f"/run/netns/{n.netns}").st_ino: n.name for n in self.tb.nodes}
        if CPUAccounting is not None and not self.args.no_cpu:
            # before any SSH connection: the ssh ControlMaster processes must start inside the controller cgroup
            listeners = {n.name: int(n.pid_file.read_text().split()[0]) for n in self.tb.nodes}
            self.acct = CPUAccounting(self.tb.nodes, listeners)
            self.log(f"CPU accounting: {self.acct.method}")
        stack = self.setup_stack()
        self.setup_job()
        self.setup_pdsh()
        launch = self.launch_rounds()
        resync = self.resync() if not self.args.no_resync else None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True).stdout.strip()
        self.doc = {"benchmark": "train_launch", "issue": 3, "llamafleet_version": __version__, "git_head": head,
                    "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                    "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "nodes": self.args.nodes,
                    "rounds": self.args.rounds, "poll_ms": self.args.poll_ms, "freeze_ranks": not self.args.no_freeze, "max_steps": self.args.max_steps,
                    "target_launch_ratio": TARGET_LAUNCH_RATIO,
                    "target_floor_ratio": TARGET_FLOOR_RATIO, "keep_warm_runs": self.keep_warms,
                    "cpu_accounting": self.acct.method if self.acct else None, "stack_setup": stack,
                    "launch": launch, "resync": resync}
        return self.report()

    def report(self) -> int:
        launch, resync = self.doc["launch"], self.doc["resync"]
        runs = launch["runs"]
        summary = {}

        def med(rows, key):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(vals) if vals else None
        for name, rows in runs.items():
            if not rows:
                continue
            summary[name] = {"runs": len(rows), "launch_s_median": med(rows, "launch_s"),
                             "launch_s_min": min((r["launch_s"] for r in rows if r.get("launch_s") is not None), default=None),
                             "launch_proc_start_s_median": med(rows, "launch_proc_start_s"),
                             "first_node_s_median": med(rows, "first_node_s"),
                             "returned_s_median": med(rows, "train_return_s" if name == LF else "pdsh_return_s"),
                             "controller_cpu_s_median": med(rows, "controller_cpu_s"),
                             "errors": sum(bool(r["errors"]) or r.get("launch_s") is None for r in rows)}
        base = summary.get(PDSH_CP, {}).get("launch_s_median")
        plain = summary.get(PDSH_PLAIN, {}).get("launch_s_median")
        floor = summary.get(FLOOR, {}).get("launch_s_median")
        for s in summary.values():
            s["ratio_vs_pdsh_cp"] = s["launch_s_median"] / base if base and s["launch_s_median"] else None
            s["ratio_vs_pdsh_plain"] = s["launch_s_median"] / plain if plain and s["launch_s_median"] else None
            s["ratio_vs_floor"] = s["launch_s_median"] / floor if floor and s["launch_s_median"] else None
        # per round, against pdsh of the same round
        by_round = {r["round"]: r["launch_s"] for r in runs[PDSH_CP] if r.get("launch_s")}
        per_round = [r["launch_s"] / by_round[r["round"]] for r in runs[LF]
                     if r.get("launch_s") and r["round"] in by_round]
        floor_by_round = {r["round"]: r["launch_s"] for r in runs.get(FLOOR, []) if r.get("launch_s")}
        per_round_floor = [r["launch_s"] / floor_by_round[r["round"]] for r in runs[LF]
                           if r.get("launch_s") and r["round"] in floor_by_round]
        n = self.args.nodes
        print()
        print(f"Launch latency on {n} namespace nodes (command start -> a rank process with the run's LLAMAFLEET_RUN_ID "
              f"live on every node; /proc polled every {self.args.poll_ms:g} ms; ranks "
              f"{'left running' if self.args.no_freeze else 'frozen (SIGSTOP) once seen'}), {self.args.rounds} rounds, medians")
        print("| method | all ranks running s median (min) | by process start time s | first node s | "
              "command returned s | ctrl CPU s | x pdsh(CP) | x pdsh(plain) | x floor |")
        print("|---|---|---|---|---|---|---|---|---|")

        def f(x, p=2):
            return f"{x:.{p}f}" if x is not None else "-"
        for name, s in summary.items():
            print(f"| {name} | {f(s['launch_s_median'])} ({f(s['launch_s_min'])}) | {f(s['launch_proc_start_s_median'])} | "
                  f"{f(s['first_node_s_median'])} | {f(s['returned_s_median'])} | {f(s['controller_cpu_s_median'])} | "
                  f"{f(s['ratio_vs_pdsh_cp'], 1)} | {f(s['ratio_vs_pdsh_plain'], 1)} | {f(s['ratio_vs_floor'])} |"
                  + (f"  ({s['errors']} runs with ERRORS)" if s["errors"] else ""))
        verdicts = {}
        ratio = summary.get(LF, {}).get("ratio_vs_pdsh_cp")
        if ratio is not None:
            verdicts["launch"] = {"ratio": ratio, "per_round": per_round,
                                  "verdict": "PASS" if ratio <= TARGET_LAUNCH_RATIO else "MISS"}
            print(f"target launch <= {TARGET_LAUNCH_RATIO:g}x pdsh (ControlPersist): {ratio:.1f}x "
                  f"{verdicts['launch']['verdict']} (per round: {', '.join(f'{x:.1f}' for x in per_round)})")
            if summary.get(LF, {}).get("ratio_vs_pdsh_plain") is not None:
                print(f"  against plain pdsh: {summary[LF]['ratio_vs_pdsh_plain']:.1f}x")
        floor_ratio = summary.get(LF, {}).get("ratio_vs_floor")
        if floor_ratio is not None:
            verdicts["launch_vs_floor"] = {"ratio": floor_ratio, "per_round": per_round_floor,
                                           "verdict": "PASS" if floor_ratio <= TARGET_FLOOR_RATIO else "MISS"}
            print(f"target launch <= {TARGET_FLOOR_RATIO:g}x the one-task ansible-playbook floor (issue 13): "
                  f"{floor_ratio:.2f}x {verdicts['launch_vs_floor']['verdict']} "
                  f"(per round: {', '.join(f'{x:.2f}' for x in per_round_floor)})")

        # the profile of llamafleet's launch: medians per task over the measured rounds
        prof = merge_profiles([r["profile"] for r in runs[LF] if r.get("profile")])
        self.doc["launch"]["profile_median"] = prof
        if prof:
            print()
            print(f"Where llamafleet's launch goes (train() event times as they reach this process; medians of "
                  f"{prof['runs']} rounds; all ranks running at {f(prof['done_s'])} s, train() returned "
                  f"{f(summary[LF]['returned_s_median'])} s):")
            print(f"  {prof['first_event_s']:6.2f} s  start -> first task event (imports, ansible-runner, "
                  f"ansible-playbook start, inventory, plugins)")
            for row in prof["tasks"]:
                st = ",".join(f"{k}={v}" for k, v in sorted(row["statuses"].items()))
                print(f"  {row['span_s']:6.2f} s  at {row['start_s']:6.2f}  {row['task'][:70]:70s} {st}")
            print(f"  {prof['after_last_event_s']:6.2f} s  last event -> train() returned")
            if prof.get("node_s"):
                print("  inside the start task, on the nodes (s from the command's start: median / slowest node):")
                for k, v in prof["node_s"].items():
                    print(f"  {v['median']:6.2f} / {v['max']:5.2f}  {NODE_STEPS.get(k, k)}")
            print("  by kind:")
            for cat, sec in sorted(prof["categories_s"].items(), key=lambda kv: -kv[1]):
                print(f"  {sec:6.2f} s  {cat}")

        if resync:
            print()
            ds = resync["dataset"]
            print(f"Re-sync of an unchanged {ds['bytes'] / 1e6:.0f} MB dataset to {n} nodes "
                  f"(staged inputs {resync['stage_bytes'] / 1e6:.1f} MB per node), {self.args.rounds} rounds, medians")
            print("| method | file data moved (sum over nodes), B | files transferred | itemized lines | wall s median (min) |")
            print("|---|---|---|---|---|")
            rs = {}
            for name, rows in resync["unchanged_rounds"].items():
                walls = [r["wall_s"] for r in rows]
                moved = [r["total"]["transferred_file_size"] for r in rows]
                rs[name] = {"wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
                            "transferred_file_size_max": max(moved),
                            "files_transferred_max": max(r["total"]["files_transferred"] for r in rows),
                            "itemized_lines_max": max(r["total"]["itemized_lines"] for r in rows),
                            "literal_data_max": max(r["total"]["literal_data"] for r in rows),
                            "bytes_sent_median": statistics.median(r["total"]["bytes_sent"] for r in rows),
                            "bytes_received_median": statistics.median(r["total"]["bytes_received"] for r in rows)}
                s = rs[name]
                print(f"| {name} (unchanged) | {s['transferred_file_size_max']} | {s['files_transferred_max']} | "
                      f"{s['itemized_lines_max']} | {s['wall_s_median']:.2f} ({s['wall_s_min']:.2f}) |")
            ut = resync["unchanged_train"]
            if ut.get("sync_task"):
                st = ut["sync_task"]
                print(f"| train()'s sync task (unchanged) | - | - | statuses {st['statuses']} | {st['span_s']:.2f} |")
            fd = resync["first_copy_dry_run_llamafleet"]["total"]
            fr = resync["first_copy_raw"]
            ft = resync["first_sync_train"]
            print(f"| llamafleet first copy | {fd['transferred_file_size']} (rsync --dry-run) | {fd['files_transferred']} "
                  f"| {fd['itemized_lines']} | {ft['sync_task']['span_s'] if ft.get('sync_task') else float('nan'):.2f} "
                  f"(train()'s sync task) |")
            print(f"| raw parallel rsync first copy | {fr['total']['transferred_file_size']} | "
                  f"{fr['total']['files_transferred']} | - | {fr['wall_s']:.2f} |")
            lfm = rs["llamafleet rsync argv"]["transferred_file_size_max"]
            verdicts["resync"] = {"moved_bytes": lfm, "verdict": "PASS" if lfm == 0 else "MISS"}
            ratio_rs = rs["llamafleet rsync argv"]["wall_s_median"] / rs["raw parallel rsync"]["wall_s_median"]
            print(f"target: an unchanged re-sync moves no file data: {lfm} B {verdicts['resync']['verdict']}; "
                  f"wall {ratio_rs:.2f}x the raw rsync; train() end to end: first copy {ft['train_return_s']:.1f} s, "
                  f"unchanged {ut['train_return_s']:.1f} s")
            self.doc["resync"]["summary"] = rs
        self.doc["summary"] = summary
        self.doc["verdicts"] = verdicts
        self.doc["warnings"] = self.warnings
        self.doc["errors"] = self.errors
        out_dir = BENCH / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"train_launch-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        print(f"\nresults: {out}")
        if self.errors:
            print(f"ERRORS: {len(self.errors)}", file=sys.stderr)
            return 1
        return 0

    def teardown(self) -> None:
        try:
            for rid in sorted(self.runs_started):
                if marked_processes(rid):
                    print(f"teardown: stopping run {rid}", file=sys.stderr)
                    self.kill_run(rid, grace=5)
        finally:
            if self.pdsh_cp_dir.exists():
                for sock in self.pdsh_cp_dir.iterdir():  # close pdsh's ControlMasters before the nodes go
                    subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True,
                                   timeout=10)
            try:
                self.tb.down()
            finally:
                if self.acct is not None:
                    self.acct.cleanup()


# -- profile of a train() from its events --------------------------------------------------------------

def profile(events: list[tuple[float, str, str, str]], t0: float, done_at: float | None,
            t_ret: float | None = None) -> dict:
    """Tasks in order (a task begins when an event names a task other than the current one; the linear
    strategy finishes a task on every host before the next starts), each with its start and span."""
    tasks: list[dict] = []
    for t, host, task, status in events:
        if not tasks or tasks[-1]["task"] != task:
            tasks.append({"task": task, "start": t, "end": t, "statuses": {}, "hosts": {}})
        row = tasks[-1]
        row["end"] = t
        h = row["hosts"].setdefault(host, [t, t])
        if status == "started":
            h[0] = t
        else:
            h[1] = t
            row["statuses"][status] = row["statuses"].get(status, 0) + 1
    end = events[-1][0] if events else t0
    rows = []
    for i, row in enumerate(tasks):
        nxt = tasks[i + 1]["start"] if i + 1 < len(tasks) else row["end"]
        per_host = [e - s for s, e in row["hosts"].values()]
        rows.append({"task": row["task"], "start_s": row["start"] - t0, "span_s": nxt - row["start"],
                     "host_max_s": max(per_host) if per_host else 0.0, "statuses": row["statuses"],
                     "hosts": len(row["hosts"])})
    done_in = None
    if done_at is not None:
        for row in rows:
            if row["start_s"] <= done_at - t0:
                done_in = row["task"]
    return {"first_event_s": (events[0][0] - t0) if events else None, "last_event_s": end - t0, "tasks": rows,
            "after_last_event_s": (t_ret - end) if t_ret is not None else None,
            "done_s": (done_at - t0) if done_at else None, "done_during_task": done_in}


def _category(row: dict) -> str:
    task, st = row["task"], row["statuses"]
    if task.startswith("Validating arguments against arg spec"):
        return "implicit role argument-spec validation tasks (every host)"
    if set(st) == {"skipped"}:
        return "skipped tasks (a worker per host even so)"
    if row["hosts"] == 1:
        return "run_once tasks on the controller (validate, plan)"
    return f"per-node task: {task[:60]}"


NODE_STEPS = {"module": "the start module runs (ssh, AnsiballZ, imports)",
              "checked": "its check done (inputs, stack state, digest, clock)",
              "agreed": "the all-or-nothing answer at the rendezvous port",
              "written": "the run's files written (node.env, launch.sh, ...)",
              "supervisor_up": "the supervisor up, the ranks starting"}


def merge_profiles(profiles: list[dict]) -> dict | None:
    if not profiles:
        return None
    first = profiles[0]
    same = [p for p in profiles if [r["task"] for r in p["tasks"]] == [r["task"] for r in first["tasks"]]]
    rows = []
    for i, row in enumerate(first["tasks"]):
        rows.append({**row, "start_s": statistics.median(p["tasks"][i]["start_s"] for p in same),
                     "span_s": statistics.median(p["tasks"][i]["span_s"] for p in same),
                     "host_max_s": statistics.median(p["tasks"][i]["host_max_s"] for p in same)})
    cats: dict[str, float] = {}
    for row in rows:
        cats[_category(row)] = cats.get(_category(row), 0.0) + row["span_s"]
    done = [p["done_s"] for p in same if p.get("done_s") is not None]
    steps = [p["node_s"] for p in same if p.get("node_s")]
    node_s = {k: {m: statistics.median(st[k][m] for st in steps if k in st) for m in ("median", "max")}
              for k in (steps[0] if steps else {})}
    return {"runs": len(same), "tasks": rows, "categories_s": cats, "node_s": node_s,
            "first_event_s": statistics.median(p["first_event_s"] for p in same),
            "after_last_event_s": statistics.median(p["after_last_event_s"] for p in same), "done_s": statistics.median(done) if done else None,
            "done_during_task": [p.get("done_during_task") for p in same]}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slot", type=int, default=5, help="testbed slot (the test suite uses 1 and 9, provision_noop 2)")
    p.add_argument("--workdir", help="default: a new directory under /tmp, removed at the end")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--stack-root", help="a llamafleet root holding the default stack (stacks/current) to hard-link "
                                        "to every node; provisioned there (and kept) if it has none. Default: "
                                        "provision node1 of the testbed")
    p.add_argument("--dataset-mb", type=float, default=200)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--poll-ms", type=float, default=50)
    p.add_argument("--launch-timeout", type=float, default=180)
    p.add_argument("--no-freeze", action="store_true",
                   help="let each rank run on once seen (default: SIGSTOP it when seen, SIGCONT before the stop, so "
                        "that its start-up does not take the shared cores from the other nodes' launch)")
    p.add_argument("--no-plain-pdsh", action="store_true")
    p.add_argument("--no-floor", action="store_true", help="skip the ansible-playbook one-task floor row")
    p.add_argument("--no-resync", action="store_true")
    p.add_argument("--no-cpu", action="store_true", help="no cgroup CPU accounting")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd, /proc of every process)", file=sys.stderr)
        return 2
    for tool in ("pdsh", "rsync", "ip", "unshare", "cp"):
        if not shutil.which(tool):
            print(f"needs {tool} (make setup)", file=sys.stderr)
            return 2
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="lfbench-train-")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the runs, tearing the testbed down", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            bench.teardown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if own_workdir and not args.keep_workdir:
                shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
