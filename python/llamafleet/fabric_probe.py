# -*- coding: utf-8 -*-
"""The fabric check's ranks: real collectives across every node and GPU, started exactly as training is.

llamafleet writes this file into a run directory and starts it on every node with the run's own stack
(torchrun of that venv, the node's rendered node.env, the same rendezvous), under the node's supervisor,
like a training run. It measures, in this order (rank 0 appends one line to ``output/trainer_log.jsonl``
after each, which is the progress the supervisor and ``follow`` read):

1. latency: an all_reduce of one float, averaged;
2. all_reduce of every size (1 MB to 256 MB by default) across the whole world: algorithm and bus
   bandwidth (nccl-tests' definition: busbw = algbw x 2(n-1)/n), the time being the slowest rank's;
3. inside each node with more than one rank (GPUs of one node), all nodes at once: the node's bus bandwidth;
4. every node's link: node i with node i+1 (a ring of pairs, one pair at a time, each node's first rank),
   all_reduce of one size; a node's figure is the best of its links (a slow node is slow on both of its
   links, its neighbours are fast on their other one), so the slowest node is named.

Each node also reports the interface its traffic leaves by: with NCCL, NCCL's own choice parsed from its
``NCCL_DEBUG=INFO`` output (network plugin, devices, the transports of its channels); with gloo, the
interface of the address that reaches the master (or GLOO_SOCKET_IFNAME); with HCCL, HCCL_SOCKET_IFNAME.

Rank 0 judges the figures (``judge``: a node below ``--min-gbps``, or below ``--min-ratio`` of the median
node), writes ``output/fabric.json`` and exits 3 when a node is below a threshold: the run fails, every node's
supervisor stops, and the reason is in the report. A collective that does not complete within ``--timeout``
raises on every rank (the process group's timeout), which fails the run too.

Standard library and torch only; ``judge`` and the NCCL parser need neither, for unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import sys
import time

MB = 1 << 20
BELOW = 3  # exit code: a node below a threshold (the figures are in fabric.json all the same)

_NCCL_NET = re.compile(r"NET/(\w+) : Using (.+)$")
_NCCL_NETWORK = re.compile(r"Using network (\w+)")
_NCCL_VIA = re.compile(r"via (P2P/\S+|NET/\S+|SHM/\S+|SHM|COLLNET\S*)")
_NCCL_VERSION = re.compile(r"NCCL version (\S+)")
_NCCL_BOOTSTRAP = re.compile(r"Bootstrap : Using (\S+?)(?::[\d.]+)?(?:<\d+>)?$")


def parse_nccl(text: str) -> dict:
    """What NCCL said it chose, from its NCCL_DEBUG=INFO lines: version, network plugin and devices, transports."""
    out: dict = {"version": None, "bootstrap": None, "network": None, "devices": [], "transports": []}
    for line in text.splitlines():
        m = _NCCL_BOOTSTRAP.search(line)
        if m and not out["bootstrap"]:
            out["bootstrap"] = m.group(1)
        m = _NCCL_VERSION.search(line)
        if m and not out["version"]:
            out["version"] = m.group(1)
        m = _NCCL_NET.search(line)
        if m:
            out["network"] = out["network"] or m.group(1)
            for dev in re.findall(r"\[\d+\](\S+)", m.group(2)):
                dev = re.sub(r"<\d+>$", "", dev)
                if dev not in out["devices"]:
                    out["devices"].append(dev)
        m = _NCCL_NETWORK.search(line)
        if m:
            out["network"] = m.group(1)
        for via in _NCCL_VIA.findall(line):
            parts = via.split("/")
            kind = "/".join(parts[:2]) if parts[0] in ("P2P", "NET") else parts[0]  # NET/IB/0 -> NET/IB
            if kind not in out["transports"]:
                out["transports"].append(kind)
    return out


def judge(nodes: list, min_gbps: float, min_ratio: float) -> list:
    """The problems of the nodes' link figures (``link_gbps``, None where not measured): below ``min_gbps``
    (0: no floor) or below ``min_ratio`` of the median of the nodes (0: no ratio). One line per node."""
    figures = [n["link_gbps"] for n in nodes if n.get("link_gbps") is not None]
    median = statistics.median(figures) if figures else 0.0
    problems = []
    for n in nodes:
        bw = n.get("link_gbps")
        if bw is None:
            continue
        if min_gbps and bw < min_gbps:
            problems.append("%s: its link carries %.3f GB/s, below the floor of %.3f GB/s (fabric_min_gbps)"
                            % (n["name"], bw, min_gbps))
        elif min_ratio and len(figures) > 2 and bw < min_ratio * median:
            problems.append("%s: its link carries %.3f GB/s, below %.0f%% of the nodes' median %.3f GB/s "
                            "(fabric_min_ratio): check its interface, cable, switch port or NCCL_SOCKET_IFNAME"
                            % (n["name"], bw, 100 * min_ratio, median))
    return problems


def slowest(nodes: list):
    """The node with the lowest link figure, when there are more than two (two nodes share their one link)."""
    measured = [n for n in nodes if n.get("link_gbps") is not None]
    if len(measured) < 3:
        return None
    return min(measured, key=lambda n: n["link_gbps"])["name"]


def _interface_of(addr: str) -> tuple:
    """(interface, local address) this host reaches ``addr`` from: the route's source address, named."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            local = s.getsockname()[0]
    except OSError:
        return None, None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == local:
                return name, local
    return None, local


class _Ranks:
    """This process in the world, and what it needs to time a collective on its device."""

    def __init__(self, backend: str, timeout_s: float, run_dir: str):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.backend = backend
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
        self.node = os.environ.get("LLAMAFLEET_NODE") or socket.gethostname()
        self.nccl_file = None
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            os.environ.setdefault("NCCL_DEBUG", "INFO")
            self.nccl_file = os.path.join(run_dir, "nccl.%s.%d.log" % (self.node, self.local_rank))
            os.environ.setdefault("NCCL_DEBUG_FILE", self.nccl_file)
            self.nccl_file = os.environ["NCCL_DEBUG_FILE"]
        elif backend == "hccl":
            import torch_npu  # noqa: F401  (registers the npu device and the hccl backend)

            torch.npu.set_device(self.local_rank)
            self.device = torch.device("npu", self.local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))

    def sync(self) -> None:
        if self.backend == "nccl":
            self.torch.cuda.synchronize()
        elif self.backend == "hccl":
            self.torch.npu.synchronize()

    def timed(self, nbytes: int, iters: int, group=None) -> float:
        """Seconds per all_reduce of ``nbytes`` in ``group``: one warm-up, then the mean of ``iters``."""
        t = self.torch.ones(max(1, nbytes // 4), dtype=self.torch.float32, device=self.device)
        self.dist.all_reduce(t, group=group)
        self.sync()
        self.dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(iters):
            self.dist.all_reduce(t, group=group)
        self.sync()
        return (time.perf_counter() - start) / iters

    def slowest_time(self, seconds: float) -> float:
        t = self.torch.tensor([seconds], dtype=self.torch.float64 if self.backend == "gloo" else self.torch.float32,
                              device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


class _Progress:
    """Rank 0's progress lines, in LLaMA-Factory's trainer_log.jsonl shape (what follow and the supervisor read)."""

    def __init__(self, path: str | None, total: int):
        self.path, self.total, self.done, self.start = path, total, 0, time.time()
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def step(self, what: str) -> None:
        self.done += 1
        if not self.path:
            return
        elapsed = time.time() - self.start
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"current_steps": self.done, "total_steps": self.total, "what": what,
                                 "percentage": round(100.0 * self.done / self.total, 2),
                                 "elapsed_time": "%.1fs" % elapsed,
                                 "remaining_time": "%.1fs" % (elapsed / self.done * (self.total - self.done))}) + "\n")


def _whoami(r: _Ranks) -> dict:
    backend = r.backend
    if backend == "gloo":
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        found, addr = _interface_of(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        link = {"interface": iface or found, "address": addr}
    elif backend == "hccl":
        link = {"interface": os.environ.get("HCCL_SOCKET_IFNAME"), "address": None}
    else:
        link = {"interface": os.environ.get("NCCL_SOCKET_IFNAME"), "address": None}
    return {"rank": r.rank, "local_rank": r.local_rank, "node_rank": r.node_rank, "node": r.node, **link}


def _node_groups(r: _Ranks, me: list) -> tuple:
    """(node rank -> global ranks, node order, the process group of this node's ranks or None)."""
    ranks: dict = {}
    names: dict = {}
    for m in me:
        ranks.setdefault(m["node_rank"], []).append(m["rank"])
        names[m["node_rank"]] = m["node"]
    order = sorted(ranks)
    mine = None
    for nr in order:  # every rank creates every group, in the same order
        if len(ranks[nr]) > 1:
            g = r.dist.new_group(sorted(ranks[nr]))
            if nr == r.node_rank:
                mine = g
    return ranks, names, order, mine


def _pairs(order: list) -> list:
    if len(order) < 2:
        return []
    if len(order) == 2:
        return [(order[0], order[1])]
    return [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]


def _measure(r: _Ranks, args, progress: _Progress) -> dict:
    me = r.gather(_whoami(r))
    ranks, names, order, intra_group = _node_groups(r, me)
    lat = r.slowest_time(r.timed(4, 20))
    progress.step("latency")
    sizes = []
    for mb in args.sizes:
        t = r.slowest_time(r.timed(int(mb * MB), args.iters))
        alg = mb * MB / t / 1e9
        sizes.append({"bytes": int(mb * MB), "time_us": round(t * 1e6, 1), "algbw_gbps": round(alg, 4),
                      "busbw_gbps": round(alg * 2 * (r.world - 1) / r.world, 4) if r.world > 1 else None})
        progress.step("all_reduce %g MB" % mb)
    intra = {}
    if any(len(v) > 1 for v in ranks.values()):
        t = r.timed(int(args.pair_mb * MB), args.iters, group=intra_group) if intra_group is not None else None
        n = len(ranks[r.node_rank])
        bus = (args.pair_mb * MB / t / 1e9) * 2 * (n - 1) / n if t else None
        intra = {m["node_rank"]: v for m, v in zip(me, r.gather(bus)) if m["local_rank"] == 0}
        progress.step("inside each node")
    links = []
    leaders = {nr: min(ranks[nr]) for nr in order}
    for a, b in _pairs(order):
        group = r.dist.new_group([leaders[a], leaders[b]])
        bw = None
        if r.rank in (leaders[a], leaders[b]):
            bw = args.pair_mb * MB / r.timed(int(args.pair_mb * MB), args.iters, group=group) / 1e9
        got = [x for x in r.gather(bw) if x is not None]
        links.append({"nodes": [names[a], names[b]], "gbps": round(min(got), 4) if got else None})
        progress.step("link %s-%s" % (names[a], names[b]))
    return {"me": me, "order": order, "names": names, "ranks": ranks, "latency_us": round(lat * 1e6, 1),
            "sizes": sizes, "intra": intra, "links": links}


def _report(r: _Ranks, args, m: dict, nccl: list) -> dict:
    nodes = []
    for nr in m["order"]:
        name = m["names"][nr]
        mine = [x for x in m["links"] if name in x["nodes"] and x["gbps"] is not None]
        first = next(x for x in m["me"] if x["node_rank"] == nr and x["rank"] == min(m["ranks"][nr]))
        said = next((x for x in nccl if x and x["node"] == name), None)
        nodes.append({"name": name, "node_rank": nr, "ranks": len(m["ranks"][nr]),
                      "interface": first["interface"], "address": first["address"],
                      "link_gbps": max(x["gbps"] for x in mine) if mine else None,
                      "intra_busbw_gbps": round(m["intra"][nr], 4) if m["intra"].get(nr) else None,
                      "nccl": {k: v for k, v in said.items() if k != "node"} if said else None})
    problems = judge(nodes, args.min_gbps, args.min_ratio)
    return {"ok": not problems, "backend": r.backend, "world_size": r.world, "nodes": nodes, "links": m["links"],
            "latency_us": m["latency_us"], "sizes": m["sizes"], "slowest": slowest(nodes), "problems": problems,
            "thresholds": {"min_gbps": args.min_gbps, "min_ratio": args.min_ratio}}


def _print(report: dict) -> None:
    print("fabric (%s, world %d): latency %.1f us" % (report["backend"], report["world_size"], report["latency_us"]))
    for s in report["sizes"]:
        print("  all_reduce %8.1f MB  %10.1f us  algbw %8.3f GB/s  busbw %s" % (
            s["bytes"] / MB, s["time_us"], s["algbw_gbps"],
            "%.3f GB/s" % s["busbw_gbps"] if s["busbw_gbps"] is not None else "-"))
    for n in report["nodes"]:
        print("  %s: link %s GB/s, interface %s" % (n["name"], n["link_gbps"], n["interface"]))
    for p in report["problems"]:
        print("fabric: " + p)
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("gloo", "nccl", "hccl"), required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], required=True, help="MB, comma-separated")
    ap.add_argument("--pair-mb", type=float, required=True)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--min-gbps", type=float, default=0.0)
    ap.add_argument("--min-ratio", type=float, default=0.0)
    args = ap.parse_args(argv)
    r = _Ranks(args.backend, args.timeout, args.run_dir)
    nodes = int(os.environ.get("NNODES", "1"))
    total = 1 + len(args.sizes) + len(_pairs(list(range(nodes)))) + (1 if r.world > nodes else 0)
    progress = _Progress(os.path.join(args.run_dir, "output", "trainer_log.jsonl") if r.rank == 0 else None, total)
    m = _measure(r, args, progress)
    said = parse_nccl(open(r.nccl_file).read()) if r.nccl_file and os.path.exists(r.nccl_file) else None
    nccl = r.gather(dict(said, node=r.node) if said and r.local_rank == 0 else None)
    rc = 0
    if r.rank == 0:
        report = _report(r, args, m, nccl)
        path = os.path.join(args.run_dir, "output", "fabric.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(report, fh, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
        _print(report)
        rc = 0 if report["ok"] else BELOW
    r.dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    # not destroy_process_group and interpreter teardown: gloo's C++ teardown can abort at exit (upstream), and
    # the figures are written; every rank has passed the last barrier
    time.sleep(0.2)
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
