#!/usr/bin/env python3
"""Benchmark (hub fetch): a model of >= 500 MB fetched from a local hub server by 4 namespace nodes, cold and
warm, through llamafleet's train() against `hf download` run by hand on every node, in the same run.

    .venv/bin/python bench/hub_fetch.py [--nodes 4] [--rounds 3] [--slot 3] [--stack-root /tmp/lfroots/node1]

Setup: a testbed (tests/testbed.py, slot 3: one netns + real sshd per node); every node gets the already
provisioned default stack of --stack-root by a hard-link copy (`cp -al <root>/stacks <node root>/stacks`, as
bench/train_launch.py does; nothing is written into the source). The model: the built-in tiny job's model
(python/llamafleet/tinymodel.py, built by the stack's python) plus --shards safetensors shards of --shard-mib
MiB of random bytes each (valid headers), committed to tests/hubserver.py's hub, served by its own process on
the bridge address (the nodes reach it there; its request log counts what it sent). The job is examples/tiny
with that hub id as model_name_or_path and max_steps 2000 (the run is stopped right after it starts).

A warm-up train() of the local-path job (not counted: the nodes' probe caches, the dataset's first sync), then
--rounds rounds of (cold rows alternate which goes first; so do the two warm train() rows):
  by-hand cold       every node's by-hand cache dir emptied, then on the 4 nodes at once, each over its own ssh
                     (the testbed's ssh args): `HF_ENDPOINT=<url> HF_HUB_DISABLE_UPDATE_CHECK=1 <root>/stacks/current/
                     bin/hf download ORG/NAME --revision <sha> --cache-dir <root>/byhand-cache` (and HF_HOME=<root>/byhand-hfhome,
                     where the CLI keeps its marker files); wall until the last node's ssh returned.
  llamafleet cold    every node's <root>/cache/huggingface/hub emptied, then `llamafleet.train(inv, hub yaml,
                     hub_fetch="nodes", env={"HF_ENDPOINT": url})`: the fetch task's span (its first event to the
                     last node's end, from on_event) and the whole train() wall; then llamafleet.stop().
  by-hand warm       the same hf download again, every copy complete.
  llamafleet warm    train() of the hub yaml again, every copy complete: the fetch task must not run (skipped on
                     every node) and no file may be asked of the hub.
  local-path launch  train() of the same job with model_name_or_path = the same files, already on every node
                     (hard links under the node's own local dir, train_model_source nodes): what a launch costs
                     without the hub. Warm hub launch - this = what the hub adds to a warm launch.
Bytes moved: the hub's request log (tests/hubserver.py RequestRecord: bytes_sent, file GETs = GET .../resolve/...).
Targets: cold fetch <= 1.2x by-hand cold; warm: fetch task not run, 0 bytes, hub adds <= 2 s to a launch.
Prints a table, writes bench/results/hub_fetch-<date>.json. Always tears down (try/finally, Ctrl-C and SIGTERM
included): runs stopped, hub server stopped, testbed down, the workdir removed (unless --keep-workdir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

PROJECT = pathlib.Path(__file__).resolve().parents[1]
BENCH = PROJECT / "bench"
TINY = PROJECT / "examples" / "tiny"
TINYMODEL = PROJECT / "python" / "llamafleet" / "tinymodel.py"
MODEL_ID = "lfbench/tiny-qwen-padded"
JOB = "hubfetch"  # train_job of both yamls: one job, so the hub yaml and the local one share the synced dataset
FETCH_TASK = "Fetch the run's hub models"
CHECK_TASK = "Check the node before any rank starts"
TARGET_COLD_RATIO = 1.2
TARGET_WARM_EXTRA_S = 2.0
MARKER = b"LLAMAFLEET_RUN_ID="
BYHAND, LF_COLD, BYHAND_WARM, LF_WARM, LOCAL = ("by-hand cold", "llamafleet cold", "by-hand warm", "llamafleet warm",
                                                "local-path launch")

sys.path.insert(0, str(PROJECT / "tests"))

import yaml  # noqa: E402
from hubserver import HubRepos, ServerProcess, read_request_log  # noqa: E402
from testbed import Testbed  # noqa: E402


class BenchError(Exception):
    pass


def safetensors_header(tensors: dict[str, int]) -> bytes:
    """The 8-byte length + JSON header of a safetensors file whose tensors are runs of uint8 (as in
    tests/unit/test_inputs.py's safetensors()); the data follows it."""
    header, offset = {}, 0
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def marked_processes(run_id: str) -> list[int]:
    """Live processes whose environment carries LLAMAFLEET_RUN_ID=<run_id> (every node shares this machine's /proc)."""
    want = MARKER + run_id.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if want not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.append(int(entry))
        except (OSError, IndexError):
            pass
    return found


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = pathlib.Path(args.workdir).resolve()
        self.tb = Testbed(self.workdir / "testbed", nodes=args.nodes, slot=args.slot)
        self.inv = self.workdir / "inventory" / "hosts.yml"
        self.state = self.workdir / "state"
        self.job = self.workdir / "job"
        self.hub_root = self.workdir / "hub"
        self.model_src = self.workdir / "model-src"
        self.server: ServerProcess | None = None
        self.runs_started: set[str] = set()
        self.errors: list[str] = []
        self.rows: dict[str, list[dict]] = {k: [] for k in (BYHAND, LF_COLD, BYHAND_WARM, LF_WARM, LOCAL)}
        self.doc: dict = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"  ERROR: {msg}", flush=True)

    # setup ------------------------------------------------------------------------------------------

    def setup_stack(self) -> dict:
        src = pathlib.Path(self.args.stack_root).resolve()
        if not (src / "stacks" / "current").exists():
            raise BenchError(f"{src}/stacks/current does not exist: pass --stack-root, a llamafleet root holding the "
                             "provisioned default stack (e.g. a node root of the slow tests)")
        t = time.monotonic()
        for n in self.tb.nodes:
            if (n.root / "stacks").exists():
                shutil.rmtree(n.root / "stacks")
            subprocess.run(["cp", "-al", str(src / "stacks"), str(n.root / "stacks")], check=True)
        self.stack_python = src / "stacks" / "current" / "bin" / "python"
        info = {"source_root": str(src), "stack": os.readlink(src / "stacks" / "current"),
                "hardlink_copy_s": time.monotonic() - t}
        self.log(f"stack {info['stack']} hard-linked to {len(self.tb.nodes)} node roots ({info['hardlink_copy_s']:.1f} s)")
        return info

    def setup_model(self) -> dict:
        """The tiny model (loadable: the run could train) + --shards random shards; committed to the hub."""
        shutil.copytree(TINY, self.job, ignore=shutil.ignore_patterns("model", "saves", "__pycache__"))
        t = time.monotonic()
        subprocess.run([str(self.stack_python), str(TINYMODEL), str(self.model_src),
                        "--data", str(self.job / "data" / "tiny_alpaca.jsonl")], check=True, capture_output=True)
        build_s = time.monotonic() - t
        rng = random.Random(7)
        size = self.args.shard_mib * 2**20
        t = time.monotonic()
        for i in range(1, self.args.shards + 1):
            with open(self.model_src / f"padding-{i:05d}-of-{self.args.shards:05d}.safetensors", "wb") as fh:
                fh.write(safetensors_header({f"padding.{i}": size}))
                left = size
                while left:
                    n = min(left, 8 * 2**20)
                    fh.write(rng.randbytes(n))
                    left -= n
        files = {p.relative_to(self.model_src).as_posix(): p for p in sorted(self.model_src.rglob("*")) if p.is_file()}
        total = sum(p.stat().st_size for p in files.values())
        if total < 500 * 10**6:  # a quick try of the script itself; its figures do not answer the issue
            self.error(f"the model is {total:,} bytes, under the 500 MB the targets are about (--shards, --shard-mib)")
        self.sha = HubRepos(self.hub_root).commit(MODEL_ID, files, message="tiny qwen + random padding shards")
        info = {"repo_id": MODEL_ID, "commit": self.sha, "files": {k: v.stat().st_size for k, v in files.items()},
                "bytes": total, "tiny_model_build_s": build_s, "shards_write_and_commit_s": time.monotonic() - t}
        self.model_bytes = total
        self.log(f"model {MODEL_ID}@{self.sha[:12]}: {len(files)} files, {total / 1e6:.1f} MB "
                 f"({info['shards_write_and_commit_s']:.1f} s to write and commit)")
        # the same files as a local model on every node: hard links under the node's own local dir
        for n in self.tb.nodes:
            dest = n.local_source / "model"
            dest.mkdir(parents=True, exist_ok=True)
            for rel, src in files.items():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dest / rel)
        return info

    def setup_job(self) -> None:
        base = yaml.safe_load((TINY / "sft_lora.yaml").read_text())
        base.update(dataset_dir="data", max_steps=2000)
        self.hub_yaml = self.job / "hub.yaml"
        self.hub_yaml.write_text(yaml.safe_dump({**base, "model_name_or_path": MODEL_ID}, sort_keys=False))
        self.local_yaml = self.job / "local.yaml"
        self.local_yaml.write_text(yaml.safe_dump({**base, "model_name_or_path": str(self.tb.local_dir / "model")},
                                                  sort_keys=False))

    # the hub's request log ----------------------------------------------------------------------------

    def log_mark(self) -> int:
        return len(read_request_log(self.hub_root))

    def moved_since(self, mark: int) -> dict:
        recs = read_request_log(self.hub_root)[mark:]
        files = [r for r in recs if r.is_file_download]
        return {"requests": len(recs), "file_gets": len(files), "file_bytes": sum(r.bytes_sent for r in files),
                "all_bytes": sum(r.bytes_sent for r in recs), "incomplete_file_gets": sum(not r.complete for r in files),
                "by_kind": _kinds(recs)}

    # by hand ------------------------------------------------------------------------------------------

    def byhand(self, label: str, clear: bool) -> dict:
        if clear:
            for n in self.tb.nodes:
                shutil.rmtree(n.root / "byhand-cache", ignore_errors=True)
        mark = self.log_mark()
        ends: dict[str, float] = {}
        procs: dict[str, subprocess.CompletedProcess] = {}

        def one(node):
            # HF_HOME: the CLI's own marker files go to the node's root, not to this machine's ~/.cache
            cmd = (f"HF_ENDPOINT={shlex.quote(self.server.url)} HF_HUB_DISABLE_UPDATE_CHECK=1 "
                   f"HF_HOME={shlex.quote(str(node.root / 'byhand-hfhome'))} "
                   f"{shlex.quote(str(node.root / 'stacks' / 'current' / 'bin' / 'hf'))} download {MODEL_ID} "
                   f"--revision {self.sha} --cache-dir {shlex.quote(str(node.root / 'byhand-cache'))}")
            procs[node.name] = subprocess.run(["ssh", *self.tb.ssh_args(), node.ip, cmd], capture_output=True,
                                              text=True, stdin=subprocess.DEVNULL, timeout=900)
            ends[node.name] = time.monotonic()
        threads = [threading.Thread(target=one, args=(n,)) for n in self.tb.nodes]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = max(ends.values()) - t0
        r = {"wall_s": wall, "per_node_s": {k: v - t0 for k, v in sorted(ends.items())}, "moved": self.moved_since(mark)}
        for n in self.tb.nodes:
            p = procs[n.name]
            want = str(n.root / "byhand-cache" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / self.sha)
            if p.returncode != 0 or f"path: {want}" not in p.stdout:  # hf download ends with "  path: <snapshot>"
                self.error(f"{label}: hf download on {n.name} rc={p.returncode}: {(p.stdout + p.stderr)[-600:]}")
        self.log(f"  {label}: {wall:.2f} s, file bytes {r['moved']['file_bytes']:,} ({r['moved']['file_gets']} GETs)")
        return r

    # llamafleet -----------------------------------------------------------------------------------------

    def launch(self, label: str, hub_model: bool, clear: bool = False) -> dict:
        from llamafleet import stop, train
        if clear:
            for n in self.tb.nodes:
                shutil.rmtree(n.root / "cache" / "huggingface" / "hub", ignore_errors=True)
        events: list[tuple[float, str, str, str]] = []

        def on_event(ev):
            events.append((time.monotonic(), ev.host, ev.task, ev.status))
        kwargs = dict(hub_fetch="nodes", env={"HF_ENDPOINT": self.server.url}) if hub_model else \
            dict(model_source="nodes")
        mark = self.log_mark()
        t0 = time.monotonic()
        res = train(self.inv, self.hub_yaml if hub_model else self.local_yaml, workdir=self.job, replace=True,
                    on_event=on_event, extravars={"train_job": JOB}, **kwargs)
        wall = time.monotonic() - t0
        if res.run_id:
            self.runs_started.add(res.run_id)
        r = {"ok": res.ok, "run_id": res.run_id, "train_s": wall, "moved": self.moved_since(mark),
             "fetch_task": task_span(events, FETCH_TASK, t0), "check_task": task_span(events, CHECK_TASK, t0),
             "errors": list(res.errors)}
        if res.ok and hub_model:
            r["commit"] = ((res.plan or {}).get("model") or {}).get("hub", {}).get("commit")
        if not res.ok:
            self.error(f"{label}: train() failed: {res.format()[-1500:]}")
        if res.run_id:
            t = time.monotonic()
            st = stop(self.inv, res.run_id)
            r["stop_s"] = time.monotonic() - t
            r["stop_states"] = {n.name: n.state for n in st.nodes}
            self.wait_gone(res.run_id)
        f = r["fetch_task"]
        self.log(f"  {label}: train() {wall:.2f} s, fetch task "
                 + (f"{f['span_s']:.2f} s {f['statuses']}" if f else "absent")
                 + f", file bytes {r['moved']['file_bytes']:,} ({r['moved']['file_gets']} GETs)")
        return r

    def wait_gone(self, run_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while marked_processes(run_id):
            if time.monotonic() > deadline:
                left = marked_processes(run_id)
                self.error(f"run {run_id}: {len(left)} process(es) alive after llamafleet.stop: {left[:8]}; killing")
                self.kill_run(run_id)
                return
            time.sleep(0.2)

    def kill_run(self, run_id: str) -> None:
        """TERM then KILL the processes of a run this benchmark started (only those)."""
        assert run_id in self.runs_started
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in marked_processes(run_id):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while marked_processes(run_id) and time.monotonic() < deadline:
                time.sleep(0.2)

    # the run ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        from llamafleet import __version__
        os.environ["LLAMAFLEET_STATE_DIR"] = str(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.log(f"testbed: {self.args.nodes} nodes, slot {self.args.slot}, workdir {self.workdir}")
        self.tb.up()
        self.tb.write_inventory(self.inv)
        stack = self.setup_stack()
        model = self.setup_model()
        self.setup_job()
        self.server = ServerProcess(self.hub_root, host=f"{self.tb.subnet}.1")
        self.log(f"hub server {self.server.url} (pid {self.server.process.pid})")
        t = time.monotonic()
        warmup = self.launch("warm-up (local-path launch, not counted)", hub_model=False)
        self.log(f"warm-up done in {time.monotonic() - t:.1f} s")
        for rnd in range(1, self.args.rounds + 1):
            self.log(f"round {rnd}/{self.args.rounds}")
            cold = [(BYHAND, lambda: self.byhand(BYHAND, clear=True)),
                    (LF_COLD, lambda: self.launch(LF_COLD, hub_model=True, clear=True))]
            warm = [(LF_WARM, lambda: self.launch(LF_WARM, hub_model=True)),
                    (LOCAL, lambda: self.launch(LOCAL, hub_model=False))]
            if rnd % 2 == 0:
                cold.reverse()
                warm.reverse()
            for name, fn in cold + [(BYHAND_WARM, lambda: self.byhand(BYHAND_WARM, clear=False))] + warm:
                row = fn()
                row["round"] = rnd
                self.rows[name].append(row)
        self.doc = {"benchmark": "hub_fetch", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "git_head": _git_head(), "llamafleet": __version__, "host": platform.node(),
                    "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(), "args": vars(self.args),
                    "stack": stack, "model": model, "hub_url": self.server.url, "warmup": warmup, "rows": self.rows}
        return self.report()

    def report(self) -> int:
        rows = self.rows
        by_cold = med(r["wall_s"] for r in rows[BYHAND])
        by_warm = med(r["wall_s"] for r in rows[BYHAND_WARM])
        lf_fetch = med(r["fetch_task"]["span_s"] if r["fetch_task"] else None for r in rows[LF_COLD])
        lf_cold_train = med(r["train_s"] for r in rows[LF_COLD])
        lf_warm_train = med(r["train_s"] for r in rows[LF_WARM])
        local_train = med(r["train_s"] for r in rows[LOCAL])
        warm_fetch_ran = [r["fetch_task"]["statuses"] for r in rows[LF_WARM]
                          if r["fetch_task"] and set(r["fetch_task"]["statuses"]) - {"skipped"}]
        warm_bytes = sum(r["moved"]["file_bytes"] for r in rows[LF_WARM])
        warm_gets = sum(r["moved"]["file_gets"] for r in rows[LF_WARM])
        cold_ratio = lf_fetch / by_cold if lf_fetch and by_cold else None
        warm_extra = lf_warm_train - local_train if lf_warm_train and local_train else None
        cold_ok = bool(cold_ratio and cold_ratio <= TARGET_COLD_RATIO)
        warm_ok = warm_extra is not None and warm_extra <= TARGET_WARM_EXTRA_S and not warm_fetch_ran and warm_gets == 0
        want_bytes = self.model_bytes * len(self.tb.nodes)
        for name in (BYHAND, LF_COLD):
            for r in rows[name]:
                if r["moved"]["file_bytes"] != want_bytes:
                    self.error(f"{name} round {r['round']}: {r['moved']['file_bytes']:,} file bytes moved, expected "
                               f"{want_bytes:,} ({len(self.tb.nodes)} x the model)")
        for r in rows[LF_COLD]:
            if r.get("commit") != self.sha:
                self.error(f"llamafleet cold round {r['round']}: pinned {r.get('commit')}, not {self.sha}")

        def f(x, p=2):
            return "-" if x is None else f"{x:.{p}f}"

        def bytes_cell(name):
            vals = [r["moved"]["file_bytes"] for r in rows[name]]
            return f"{med(vals):,.0f}" if vals else "-"
        table = [
            "| row | wall s, median (per round) | x by-hand cold | file bytes moved per round (4 nodes) |",
            "|---|---|---|---|",
            f"| by-hand cold: `hf download` on 4 nodes at once | {f(by_cold)} ({_per(rows[BYHAND], 'wall_s')}) | 1.00 "
            f"| {bytes_cell(BYHAND)} |",
            f"| llamafleet cold: fetch task | {f(lf_fetch)} ({_per_fetch(rows[LF_COLD])}) | "
            f"**{f(cold_ratio)}** | {bytes_cell(LF_COLD)} |",
            f"| llamafleet cold: whole train() | {f(lf_cold_train)} ({_per(rows[LF_COLD], 'train_s')}) | "
            f"{f(lf_cold_train / by_cold if lf_cold_train and by_cold else None)} | (same) |",
            f"| by-hand warm: `hf download` again | {f(by_warm)} ({_per(rows[BYHAND_WARM], 'wall_s')}) | - | "
            f"{bytes_cell(BYHAND_WARM)} |",
            f"| llamafleet warm: whole train() (fetch task skipped) | {f(lf_warm_train)} "
            f"({_per(rows[LF_WARM], 'train_s')}) | - | {bytes_cell(LF_WARM)} |",
            f"| local-path launch: whole train(), model already on the nodes | {f(local_train)} "
            f"({_per(rows[LOCAL], 'train_s')}) | - | {bytes_cell(LOCAL)} |",
        ]
        summary = {
            "byhand_cold_s": by_cold, "llamafleet_cold_fetch_task_s": lf_fetch, "llamafleet_cold_train_s": lf_cold_train,
            "byhand_warm_s": by_warm, "llamafleet_warm_train_s": lf_warm_train, "local_path_train_s": local_train,
            "cold_ratio": cold_ratio, "cold_train_minus_local_s": (lf_cold_train - local_train)
            if lf_cold_train and local_train else None,
            "warm_extra_s": warm_extra, "warm_fetch_task_ran": warm_fetch_ran, "warm_file_gets": warm_gets,
            "warm_file_bytes": warm_bytes, "model_bytes": self.model_bytes,
            "target_cold": f"fetch <= {TARGET_COLD_RATIO}x by-hand cold: {'PASS' if cold_ok else 'MISS'}",
            "target_warm": f"fetch task not run, 0 bytes, hub adds <= {TARGET_WARM_EXTRA_S} s: "
                           f"{'PASS' if warm_ok else 'MISS'}",
            "table": table,
            "paired_by_round": paired_stats(rows),
        }
        self.doc["summary"] = summary
        self.doc["errors"] = self.errors
        out = BENCH / "results" / f"hub_fetch-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        self.log("\n".join([""] + table + [""]))
        self.log(f"cold: fetch task {f(lf_fetch)} s vs by-hand {f(by_cold)} s = {f(cold_ratio)}x "
                 f"-> {summary['target_cold']}")
        self.log(f"warm: hub launch {f(lf_warm_train)} s - local-path launch {f(local_train)} s = {f(warm_extra)} s; "
                 f"fetch task ran: {warm_fetch_ran or 'never'}; file GETs {warm_gets}, {warm_bytes} bytes "
                 f"-> {summary['target_warm']}")
        pr = summary["paired_by_round"]
        self.log("per round: cold fetch / by-hand " + ", ".join(f"{x:.2f}" for x in pr["cold_ratio"])
                 + "; warm hub launch - local-path launch " + ", ".join(f"{x:+.2f} s" for x in pr["warm_extra_s"]))
        self.log(f"results: {out}")
        if self.errors:
            print(f"ERRORS: {len(self.errors)}", file=sys.stderr)
            return 1
        return 0

    def teardown(self) -> None:
        try:
            for rid in sorted(self.runs_started):
                if marked_processes(rid):
                    print(f"teardown: stopping run {rid}", file=sys.stderr)
                    self.kill_run(rid)
        finally:
            try:
                if self.server is not None:
                    self.server.stop()
            finally:
                self.tb.down()


def task_span(events: list[tuple[float, str, str, str]], prefix: str, t0: float) -> dict | None:
    """A task's first event (a node's `started`) to the last node's end, its statuses and per-node spans."""
    mine = [e for e in events if e[2].startswith(prefix)]
    if not mine:
        return None
    ends = [e for e in mine if e[3] != "started"]
    starts = {}
    for t, host, _, status in mine:
        if status == "started":
            starts.setdefault(host, t)
    statuses: dict[str, int] = {}
    for _, _, _, status in ends:
        statuses[status] = statuses.get(status, 0) + 1
    end = max(e[0] for e in ends) if ends else mine[-1][0]
    return {"task": mine[0][2], "start_s": mine[0][0] - t0, "span_s": end - mine[0][0], "statuses": statuses,
            "per_node_s": {h: t - starts.get(h, mine[0][0]) for t, h, _, _ in ends}}


def paired_stats(rows: dict[str, list[dict]]) -> dict:
    """Per round (the rows of one round ran back to back, under the same load): the cold fetch task over the
    by-hand cold time, the cold launch minus the local-path launch, and the warm hub launch minus the local-path
    launch; with their medians. Less sensitive to load that changes between rounds than a ratio of medians."""
    def by_round(name):
        return {r["round"]: r for r in rows[name]}
    by, cold, warm, local = by_round(BYHAND), by_round(LF_COLD), by_round(LF_WARM), by_round(LOCAL)
    out: dict[str, list] = {"cold_ratio": [], "cold_train_minus_local_s": [], "warm_extra_s": []}
    for rnd in sorted(by):
        c, b, w, loc = cold.get(rnd), by[rnd], warm.get(rnd), local.get(rnd)
        if c and c["fetch_task"]:
            out["cold_ratio"].append(c["fetch_task"]["span_s"] / b["wall_s"])
        if c and loc:
            out["cold_train_minus_local_s"].append(c["train_s"] - loc["train_s"])
        if w and loc:
            out["warm_extra_s"].append(w["train_s"] - loc["train_s"])
    return {**out, **{f"median_{k}": med(v) for k, v in out.items()}}


def _kinds(recs) -> dict:
    out: dict[str, int] = {}
    for r in recs:
        kind = f"{r.method} {'resolve' if '/resolve/' in r.path else r.path.split('/')[1] if '/' in r.path else r.path}"
        out[kind] = out.get(kind, 0) + 1
    return out


def _per(rows, key) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in rows)


def _per_fetch(rows) -> str:
    return ", ".join(f"{r['fetch_task']['span_s']:.2f}" if r["fetch_task"] else "-" for r in rows)


def _git_head() -> str | None:
    p = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (p.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")) if p.returncode == 0 else None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slot", type=int, default=3, help="testbed slot (the test suite uses 1, others 2)")
    p.add_argument("--stack-root", default="/tmp/lfroots/node1",
                   help="a llamafleet root holding the provisioned default stack (stacks/current), hard-linked to "
                        "every node (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mib", type=int, default=128, help="MiB of random bytes per shard (default: %(default)s)")
    p.add_argument("--workdir", help="default: a new directory under /tmp, removed at the end")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd)", file=sys.stderr)
        return 2
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="lfbench-hub-")
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
