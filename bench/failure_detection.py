#!/usr/bin/env python3
"""Benchmark (failure detection): how long after a failure every rank of a real run is stopped, on 8 namespace
nodes, with the controller following the run (attached) and with nothing following it (detached).

    .venv/bin/python bench/failure_detection.py [--nodes 8] [--rounds 5] [--slot 5] [--peer-timeout 30]

Setup: a testbed (tests/testbed.py: one netns, PID namespace and real sshd per node); every node gets the
provisioned default stack of --stack-root by a hard-link copy (`cp -al`, as bench/hub_fetch.py does). The job is
the built-in tiny job (its model built by the stack's Python) with max_steps 100000: it trains until stopped.

Each round runs every (scenario, mode) pair once, the order alternating between rounds:
  scenario kill   the last node's training processes (torchrun's children running LLaMA-Factory) SIGKILLed
                  after the first step; measured: seconds until no process of the run is left on any node.
  scenario cut    the last node's link cut (`ip link set <its veth> down`) after the first step; measured:
                  seconds until no process of the run is left on the other nodes (the survivors), and until
                  the cut node's own are gone too (its supervisor no longer hears the master); then the link
                  comes back.
  mode detached   started with llamafleet.train() (no follow): nothing on the controller looks at the run.
  mode attached   llamafleet.follow() runs in a thread from the start (poll every 5 s, its default): the
                  controller sees the failure too, and answers it with stop.
Targets (issue 9): kill <= 5 s; cut: survivors <= train_peer_timeout_s + 5 s; the same attached and detached.
Process lists come from this machine's /proc (the host sees every node's PID namespace), by the run id in each
process's environment. Prints a table, writes bench/results/failure_detection-<date>.json. Always tears down
(try/finally, Ctrl-C and SIGTERM included): the runs' processes, links up, testbed down, the workdir removed
(unless --keep-workdir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROJECT = pathlib.Path(__file__).resolve().parents[1]
TINY = PROJECT / "examples" / "tiny"
TINYMODEL = PROJECT / "python" / "llamafleet" / "tinymodel.py"
MARKER = b"LLAMAFLEET_RUN_ID="
TARGET_KILL_S = 5.0
TARGET_CUT_EXTRA_S = 5.0

sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(PROJECT / "python"))

import yaml  # noqa: E402
from testbed import Testbed  # noqa: E402


class BenchError(Exception):
    pass


def marked_processes(run_id: str) -> dict[int, str]:
    """Live processes of the run (pid to their working directory), on every node."""
    want = MARKER + run_id.encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if want not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            found[int(entry)] = os.readlink(f"/proc/{entry}/cwd")
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
        self.base = self.workdir / "job"
        self.runs: set[str] = set()
        self.cut: str | None = None
        self.errors: list[str] = []
        self.rows: list[dict] = []

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        print(f"  ERROR: {msg}", flush=True)

    def node_of(self, cwd: str) -> str | None:
        for n in self.tb.nodes:
            if cwd.startswith(str(n.root) + "/"):
                return n.name
        return None

    def setup(self) -> dict:
        src = pathlib.Path(self.args.stack_root).resolve()
        if not (src / "stacks" / "current").exists():
            raise BenchError(f"{src}/stacks/current does not exist: pass --stack-root, a llamafleet root holding the "
                             "provisioned default stack (e.g. a node root of the slow tests)")
        for n in self.tb.nodes:
            if (n.root / "stacks").exists():
                shutil.rmtree(n.root / "stacks")
            subprocess.run(["cp", "-al", str(src / "stacks"), str(n.root / "stacks")], check=True)
        tiny = self.base / "examples" / "tiny"
        shutil.copytree(TINY, tiny, ignore=shutil.ignore_patterns("model", "saves", "__pycache__"))
        subprocess.run([str(src / "stacks" / "current" / "bin" / "python"), str(TINYMODEL), str(tiny / "model"),
                        "--data", str(tiny / "data" / "tiny_alpaca.jsonl")], check=True, capture_output=True)
        data = yaml.safe_load((tiny / "sft_lora.yaml").read_text())
        data.update(max_steps=100000, save_steps=1000000)
        self.yaml = tiny / "endless.yaml"
        self.yaml.write_text(yaml.safe_dump(data))
        return {"stack_root": str(src), "stack": os.readlink(src / "stacks" / "current")}

    def link(self, node: str, up: bool) -> None:
        veth = next(n.netns for n in self.tb.nodes if n.name == node) + "h"
        subprocess.run(["ip", "link", "set", veth, "up" if up else "down"], check=True)
        self.cut = None if up else node

    def wait_first_step(self, run_id: str, timeout: float = 900) -> float:
        log = self.tb.nodes[0].root / "runs" / run_id / "output" / "trainer_log.jsonl"
        t0 = time.monotonic()
        while not (log.is_file() and log.stat().st_size):
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"run {run_id}: no first step within {timeout:g} s")
            if not marked_processes(run_id):
                raise BenchError(f"run {run_id} ended before its first step; see {self.tb.nodes[0].root}/runs/{run_id}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def trial(self, scenario: str, mode: str, rnd: int) -> dict:
        from llamafleet import follow, train

        victim = self.tb.nodes[-1].name
        t_launch = time.monotonic()
        started = train(self.inv, self.yaml, workdir=self.base, peer_timeout_s=self.args.peer_timeout)
        if not started.ok:
            raise BenchError(f"launch failed: {started.format()}")
        run_id = started.run_id
        self.runs.add(run_id)
        launch_s = time.monotonic() - t_launch
        followed: dict = {}
        thread = None
        if mode == "attached":
            def watch():
                r = follow(self.inv, run_id, poll_s=5)
                followed.update(state=r.state, errors=list(r.errors), at=time.monotonic())
            thread = threading.Thread(target=watch, daemon=True)
            thread.start()
        first_step_s = self.wait_first_step(run_id)
        time.sleep(1)
        row = {"round": rnd, "scenario": scenario, "mode": mode, "run_id": run_id, "launch_s": launch_s,
               "first_step_s": first_step_s, "nodes": len(self.tb.nodes)}
        if scenario == "kill":
            victims = [p for p, cwd in marked_processes(run_id).items() if self.node_of(cwd) == victim
                       and "launcher.py" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            if not victims:
                raise BenchError(f"run {run_id}: no training process found on {victim}")
            t0 = time.monotonic()
            for p in victims:
                os.kill(p, signal.SIGKILL)
            row["all_stopped_s"] = self.until(run_id, lambda procs: not procs, t0, 120)
            row["target_s"] = TARGET_KILL_S
            row["measured_s"] = row["all_stopped_s"]
        else:
            t0 = time.monotonic()
            self.link(victim, up=False)
            try:
                row["survivors_stopped_s"] = self.until(
                    run_id, lambda procs: not [c for c in procs.values() if self.node_of(c) != victim], t0, 300)
                row["all_stopped_s"] = self.until(run_id, lambda procs: not procs, t0, 300)
            finally:
                self.link(victim, up=True)
            row["target_s"] = self.args.peer_timeout + TARGET_CUT_EXTRA_S
            row["measured_s"] = row["survivors_stopped_s"]
        reason_file = self.tb.nodes[0].root / "runs" / run_id / "supervisor.json"
        row["master_reason"] = json.loads(reason_file.read_text()).get("reason") if reason_file.exists() else None
        if thread is not None:
            thread.join(180)
            row["follow"] = {"state": followed.get("state"),
                             "ended_after_failure_s": followed["at"] - t0 if "at" in followed else None}
            if followed.get("state") != "failed":
                self.error(f"round {rnd} {scenario}/{mode}: follow ended as {followed.get('state')!r}, not failed")
        ok = row["measured_s"] is not None and row["measured_s"] <= row["target_s"]
        row["verdict"] = "PASS" if ok else "MISS"
        self.log(f"  round {rnd} {scenario:4} {mode:8}: {row['measured_s']:.2f} s (target <= {row['target_s']:g} s) "
                 f"{row['verdict']}; first step after {first_step_s:.0f} s; master: {row['master_reason']}")
        return row

    def until(self, run_id: str, done, t0: float, timeout: float) -> float | None:
        while True:
            procs = marked_processes(run_id)
            if done(procs):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.error(f"run {run_id}: {len(procs)} process(es) still alive {timeout:g} s after the failure")
                self.kill_run(run_id)
                return None
            time.sleep(0.05)

    def kill_run(self, run_id: str) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in marked_processes(run_id):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while marked_processes(run_id) and time.monotonic() < deadline:
                time.sleep(0.2)

    def run(self) -> int:
        from llamafleet import __version__

        os.environ["LLAMAFLEET_STATE_DIR"] = str(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.log(f"testbed: {self.args.nodes} nodes, slot {self.args.slot}, workdir {self.workdir}")
        self.tb.up()
        self.tb.write_inventory(self.inv, extra_group_vars={"stack_offline": True})
        setup = self.setup()
        pairs = [(s, m) for s in self.args.scenarios for m in ("detached", "attached")]
        for rnd in range(1, self.args.rounds + 1):
            self.log(f"round {rnd}/{self.args.rounds}")
            for scenario, mode in (pairs if rnd % 2 else list(reversed(pairs))):
                self.rows.append(self.trial(scenario, mode, rnd))
        doc = {"benchmark": "failure_detection", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "git_head": _git_head(), "llamafleet": __version__, "host": platform.node(), "cpus": os.cpu_count(),
               "args": vars(self.args), "setup": setup, "rows": self.rows, "errors": self.errors,
               "summary": self.summary()}
        out = PROJECT / "bench" / "results" / f"failure_detection-{datetime.date.today().isoformat()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        self.report(doc["summary"])
        self.log(f"results: {out}")
        return 1 if self.errors else 0

    def summary(self) -> list[dict]:
        rows = []
        for scenario in self.args.scenarios:
            for mode in ("detached", "attached"):
                mine = [r for r in self.rows if r["scenario"] == scenario and r["mode"] == mode]
                vals = [r["measured_s"] for r in mine]
                target = mine[0]["target_s"] if mine else None
                m = med(vals)
                rows.append({"scenario": scenario, "mode": mode, "n": len(mine), "median_s": m,
                             "min_s": min((v for v in vals if v is not None), default=None),
                             "max_s": max((v for v in vals if v is not None), default=None), "target_s": target,
                             "all_stopped_median_s": med([r["all_stopped_s"] for r in mine]),
                             "verdict": "PASS" if m is not None and target is not None and m <= target else "MISS"})
        return rows

    def report(self, summary: list[dict]) -> None:
        def f(x):
            return "-" if x is None else f"{x:.2f}"
        self.log("")
        self.log(f"{'scenario':28} {'mode':9} {'n':>2} {'median s':>9} {'min':>6} {'max':>6} {'target':>7}  verdict")
        for r in summary:
            what = {"kill": "rank SIGKILLed -> all stopped", "cut": "link cut -> survivors stopped"}[r["scenario"]]
            self.log(f"{what:28} {r['mode']:9} {r['n']:>2} {f(r['median_s']):>9} {f(r['min_s']):>6} {f(r['max_s']):>6} "
                     f"{'<= ' + format(r['target_s'], 'g'):>7}  {r['verdict']}")

    def teardown(self) -> None:
        try:
            if self.cut:
                self.link(self.cut, up=True)
            for rid in sorted(self.runs):
                if marked_processes(rid):
                    self.kill_run(rid)
        finally:
            self.tb.down()


def _git_head() -> str | None:
    p = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slot", type=int, default=5, help="testbed slot (the test suite uses 1)")
    p.add_argument("--peer-timeout", type=float, default=30, help="train_peer_timeout_s (default: %(default)s, the product's)")
    p.add_argument("--scenarios", default="kill,cut", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--stack-root", default="/tmp/lfroots/node1",
                   help="a llamafleet root holding the provisioned default stack (default: %(default)s)")
    p.add_argument("--workdir", help="default: a new directory under /tmp, removed at the end")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.nodes < 2 or set(args.scenarios) - {"kill", "cut"}:
        p.error("--rounds >= 1, --nodes >= 2, --scenarios of kill,cut")
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd)", file=sys.stderr)
        return 2
    own = args.workdir is None
    if own:
        args.workdir = tempfile.mkdtemp(prefix="lfbench-fail-")
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
            if own and not args.keep_workdir:
                shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
