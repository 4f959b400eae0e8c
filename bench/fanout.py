#!/usr/bin/env python3
"""Fan-out against the controller's uplink (issue 13): llamafleet's node-to-node fan-out against raw parallel
rsync from the controller and against one rsync to one node (the physical floor S/B), in the same run.

    .venv/bin/python bench/fanout.py [--nodes 2,4,8] [--size-mb 400] [--rate-mbit 200] [--slot 7]

Setup: a testbed of max(--nodes) namespace nodes (tests/testbed.py). The controller's uplink (egress of the
testbed bridge device: everything the controller sends to any node) and each node's link (egress of its veth
on the host side: everything any node or the controller sends to it) are shaped with tc tbf to the same rate
B. Payload: S MB of random bytes in 8 files. For each N, in this order, each into a fresh directory on
every node:
  - rsync, parallel: one `rsync` per node from the controller at once (the direct path; ~ N*S/B);
  - rsync, one node: one `rsync` to one node (S/B, the floor of anything that crosses the uplink);
  - llamafleet fan-out: `llamafleet.fanout.push()` (playbooks/fanout.yml: plan, relays, stream, verify),
    wall time of the whole playbook, Ansible included; every node's copy checked against the controller's.
Prints a table (seconds, x of S/B, growth per doubling of N) and writes bench/results/fanout-<date>.json.
Target: fan-out <= 1.5 x S/B at N = 8, growth from N = 2 to 4 to 8 <= 1.15x per doubling.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "python"))

from testbed import Testbed  # noqa: E402

from llamafleet import fanout  # noqa: E402


def tc(*args: str, check: bool = True) -> None:
    subprocess.run(["tc", *args], check=check, capture_output=True, text=True)


def shape(devs: list[str], rate_mbit: int) -> None:
    for dev in devs:
        tc("qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "100ms")


def unshape(devs: list[str]) -> None:
    for dev in devs:
        tc("qdisc", "del", "dev", dev, "root", check=False)


def payload(root: Path, size_mb: int, files: int = 8) -> Path:
    src = root / "payload"
    src.mkdir(parents=True)
    per = (size_mb << 20) // files
    for i in range(files):
        with open(src / f"shard-{i:02d}.bin", "wb") as fh:
            for _ in range(per >> 20):
                fh.write(os.urandom(1 << 20))
    return src


def digest_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def where(events: list[tuple[float, str, str]], result) -> dict:
    """Each task's span (its first event to its last, s), the stream's seconds, the relays' CPU seconds."""
    spans: dict[str, list[float]] = {}
    for at, task, _status in events:
        span = spans.setdefault(task, [at, at])
        span[1] = at
    sent = next(iter((result.results.get("fanout_send") or {}).values()), {})
    # each relay's CPU seconds, from its answer at the end of the stream (the wait task runs only where a node
    # did not answer complete: its status then)
    relays = [a.get("cpu_s") for a in sent.get("acks") or []]
    relays += [(r.get("status") or {}).get("cpu_s") for r in (result.results.get("fanout") or {}).values()
               if not r.get("skipped")]
    return {"tasks": {t: round(b - a, 2) for t, (a, b) in spans.items()}, "stream_s": sent.get("seconds"),
            "relay_cpu_s": [c for c in relays if c is not None], "first_event_s": round(events[0][0], 2) if events else None,
            "last_event_s": round(events[-1][0], 2) if events else None}


class Bench:
    def __init__(self, args):
        self.args = args
        self.counts = [int(n) for n in args.nodes.split(",")]
        self.work = Path(tempfile.mkdtemp(prefix="lfbench-fanout-"))
        self.tb = Testbed(self.work / "testbed", nodes=max(self.counts), slot=args.slot)
        self.rows: list[dict] = []

    def inventory(self, n: int) -> Path:
        names = [node.name for node in self.tb.nodes[:n]]
        return self.tb.write_inventory(self.work / f"inv{n}" / "hosts.yml", nodes=names,
                                       extra_host_vars={m: {"llamafleet_root": str(self.work / "roots" / m)} for m in names},
                                       extra_group_vars={"llamafleet_state_dir": str(self.work / "state")})

    def rsync(self, nodes, src: Path, dest: str) -> float:
        ssh = " ".join(["ssh", *self.tb.ssh_args()])
        t0 = time.monotonic()
        procs = [subprocess.Popen(["rsync", "-a", "--mkpath", "-e", ssh, f"{src}/",
                                   f"{node.ip}:{self.work / 'roots' / node.name / dest}/"]) for node in nodes]
        if any(p.wait() for p in procs):
            raise RuntimeError("an rsync failed")
        return time.monotonic() - t0

    def push(self, n: int, src: Path, dest: str) -> tuple[float, dict]:
        """The fan-out's wall time, and where it went: each task's span, the stream, the relays' CPU."""
        inv = self.inventory(n)
        events: list[tuple[float, str, str]] = []
        t0 = time.monotonic()
        result = fanout.push(inv, src, dest, on_event=lambda ev: events.append((time.monotonic() - t0, ev.task, ev.status)))
        took = time.monotonic() - t0
        if not result.ok:
            raise RuntimeError("fan-out failed: " + "; ".join(result.failure_messages()))
        want = digest_tree(src)
        for node in self.tb.nodes[:n]:
            if digest_tree(self.work / "roots" / node.name / dest) != want:
                raise RuntimeError(f"{node.name}: its copy differs from the controller's")
        return took, where(events, result)

    def run(self) -> int:
        a = self.args
        self.tb.up()
        devs = [self.tb.bridge] + [node.netns + "h" for node in self.tb.nodes]
        src = payload(self.work, a.size_mb)
        floor_s = (a.size_mb * 8 * 1.048576) / a.rate_mbit  # S/B in seconds
        shape(devs, a.rate_mbit)
        try:
            for n in self.counts:
                row = {"nodes": n, "S_over_B_s": round(floor_s, 2)}
                row["rsync_parallel_s"] = round(self.rsync(self.tb.nodes[:n], src, f"r{n}"), 2)
                row["rsync_one_s"] = round(self.rsync(self.tb.nodes[:1], src, f"one{n}"), 2)
                took, row["where"] = self.push(n, src, f"f{n}")
                row["fanout_s"] = round(took, 2)
                row["fanout_x_floor"] = round(row["fanout_s"] / row["rsync_one_s"], 3)
                self.rows.append(row)
                print(f"  N={n}: rsync parallel {row['rsync_parallel_s']} s, one rsync {row['rsync_one_s']} s, "
                      f"fan-out {row['fanout_s']} s ({row['fanout_x_floor']}x the one-rsync floor)", flush=True)
                print(f"    where: {json.dumps(row['where'])}", flush=True)
        finally:
            unshape(devs)
        return self.report(floor_s)

    def report(self, floor_s: float) -> int:
        a = self.args
        print(f"\nS = {a.size_mb} MB, B = {a.rate_mbit} Mbit/s (S/B = {floor_s:.1f} s)")
        print(f"{'N':>3} {'rsync parallel':>15} {'one rsync':>10} {'fan-out':>8} {'x floor':>8} {'growth':>7}")
        prev = None
        for r in self.rows:
            growth = f"{r['fanout_s'] / prev:.2f}x" if prev else ""
            r["growth"] = round(r["fanout_s"] / prev, 3) if prev else None
            prev = r["fanout_s"]
            print(f"{r['nodes']:>3} {r['rsync_parallel_s']:>15} {r['rsync_one_s']:>10} {r['fanout_s']:>8} "
                  f"{r['fanout_x_floor']:>7}x {growth:>7}")
        last = self.rows[-1]
        growths = [r["growth"] for r in self.rows if r["growth"]]
        ok = last["fanout_x_floor"] <= 1.5 and all(g <= 1.15 for g in growths)
        print(f"target: <= 1.5x the floor at N = {last['nodes']}, <= 1.15x per doubling: {'PASS' if ok else 'MISS'}")
        out = ROOT / "bench" / "results" / f"fanout-{datetime.datetime.now():%Y%m%d-%H%M}.json"
        out.write_text(json.dumps({"benchmark": "fanout", "args": vars(a), "rows": self.rows, "pass": ok,
                                   "date": datetime.datetime.now().isoformat(timespec="seconds")}, indent=1))
        print(f"results: {out}")
        return 0

    def teardown(self) -> None:
        self.tb.down()
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="2,4,8")
    p.add_argument("--size-mb", type=int, default=400)
    p.add_argument("--rate-mbit", type=int, default=200)
    p.add_argument("--slot", type=int, default=7)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/fanout.py needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        return bench.run()
    finally:
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
