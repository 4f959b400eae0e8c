#!/usr/bin/env python3
"""Benchmark (serve): readiness (command -> first chat completion answered) and completion latency of
`llamafleet.serve()` against `llamafactory-cli api` started by hand over ssh on the same node, in the same run.

    .venv/bin/python bench/serve_readiness.py [--rounds 3] [--completions 10] [--slot 6]

Setup: a one-node testbed (tests/testbed.py, slot 6) with the provisioned default stack of --stack-root
hard-linked in (`cp -al`, as the other benchmarks), and one real training run of the built-in tiny job on it
(`llamafleet.train`, 4 steps): its LoRA adapter is what both serve.
Each round, in alternating order:
  by hand     over one ssh: `cd <run dir>; . ./node.env` (the run's environment: its stack first on PATH, the
              hub offline), the rendezvous variables unset, API_HOST/API_PORT/API_KEY/API_MODEL_NAME exported,
              `setsid nohup llamafactory-cli api api.yaml` with the same api.yaml llamafleet writes (base model +
              adapter, template, huggingface backend); readiness = from the ssh command's start until this
              controller got its first chat completion answered (polled every 0.2 s: /v1/models, then one POST).
  llamafleet  `llamafleet.serve(inventory, run_id, port=...)`, which returns once the server listed the model,
              answered a completion and refused a request without the key; readiness = from the call until
              this controller got its first chat completion answered right after it returned.
Then --completions chat completions (max_tokens 8, temperature 0, the same prompt) one after another against
each server: latency = their median. Targets (issue 11): readiness <= 1.2x by hand, latency <= 1.05x.
Prints a table, writes bench/results/serve_readiness-<date>.json. Tears everything down (servers, testbed,
workdir unless --keep-workdir), also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PROJECT = pathlib.Path(__file__).resolve().parents[1]
TINY = PROJECT / "examples" / "tiny"
TINYMODEL = PROJECT / "python" / "llamafleet" / "tinymodel.py"
TARGET_READY = 1.2
TARGET_LATENCY = 1.05

sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(PROJECT / "python"))

import yaml  # noqa: E402
from testbed import Testbed  # noqa: E402


class BenchError(Exception):
    pass


def ask(endpoint: str, key: str, model: str, timeout: float = 120) -> tuple[int | None, float]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(endpoint + "/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            json.loads(resp.read())
            return resp.status, time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, time.monotonic() - t0
    except (OSError, ValueError):
        return None, time.monotonic() - t0


def listed(endpoint: str, key: str, model: str) -> bool:
    req = urllib.request.Request(endpoint + "/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return model in [m.get("id") for m in json.loads(resp.read()).get("data", [])]
    except (OSError, ValueError):
        return False


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = pathlib.Path(args.workdir).resolve()
        self.tb = Testbed(self.workdir / "testbed", nodes=1, slot=args.slot)
        self.inv = self.workdir / "inventory" / "hosts.yml"
        self.base = self.workdir / "job"
        self.rows: dict[str, list[dict]] = {"by hand": [], "llamafleet": []}
        self.errors: list[str] = []
        self.key = "bench-" + os.urandom(12).hex()

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def setup(self) -> None:
        from llamafleet import train

        src = pathlib.Path(self.args.stack_root).resolve()
        if not (src / "stacks" / "current").exists():
            raise BenchError(f"{src}/stacks/current does not exist: pass --stack-root (a root of the slow tests)")
        node = self.tb.nodes[0]
        subprocess.run(["cp", "-al", str(src / "stacks"), str(node.root / "stacks")], check=True)
        tiny = self.base / "examples" / "tiny"
        shutil.copytree(TINY, tiny, ignore=shutil.ignore_patterns("model", "saves", "__pycache__"))
        subprocess.run([str(src / "stacks" / "current" / "bin" / "python"), str(TINYMODEL), str(tiny / "model"),
                        "--data", str(tiny / "data" / "tiny_alpaca.jsonl")], check=True, capture_output=True)
        data = yaml.safe_load((tiny / "sft_lora.yaml").read_text())
        data.update(max_steps=4, save_steps=100)
        (tiny / "serve.yaml").write_text(yaml.safe_dump(data))
        result = train(self.inv, tiny / "serve.yaml", workdir=self.base, follow_run=True, poll_s=2)
        if not result.ok:
            raise BenchError(f"training the adapter failed: {result.format()}")
        self.run_id = result.run_id
        self.run_dir = node.root / "runs" / self.run_id
        trained = yaml.safe_load((self.run_dir / "train.yaml").read_text())
        self.api_yaml = {"model_name_or_path": trained["model_name_or_path"], "adapter_name_or_path":
                         str(self.run_dir / "output"), "template": trained["template"], "finetuning_type": "lora",
                         "infer_backend": "huggingface"}
        self.log(f"run {self.run_id} trained; its adapter is served")

    def by_hand(self, port: int) -> dict:
        node = self.tb.nodes[0]
        hand = self.run_dir / "byhand"
        hand.mkdir(exist_ok=True)
        (hand / "api.yaml").write_text(json.dumps(self.api_yaml))
        (hand / "key").write_text(self.key)
        script = (f"cd {shlex.quote(str(self.run_dir))} && . ./node.env && unset FORCE_TORCHRUN NNODES NODE_RANK "
                  f"MASTER_ADDR MASTER_PORT NPROC_PER_NODE && export API_HOST={node.ip} API_PORT={port} "
                  f"API_MODEL_NAME=byhand API_KEY=$(cat byhand/key) && cd byhand && "
                  "{ setsid nohup llamafactory-cli api api.yaml > api.log 2>&1 < /dev/null & echo $!; }")
        endpoint = f"http://{node.ip}:{port}/v1"
        t0 = time.monotonic()
        pid = int(self.tb.ssh(node, script).stdout.split()[-1])
        self.byhand_pids = [pid]
        while True:
            if time.monotonic() - t0 > 900:
                raise BenchError("the server started by hand did not answer within 900 s")
            if listed(endpoint, self.key, "byhand") and ask(endpoint, self.key, "byhand")[0] == 200:
                break
            time.sleep(0.2)
        return {"ready_s": time.monotonic() - t0, "endpoint": endpoint, "model": "byhand"}

    def stop_by_hand(self) -> None:
        self.tb.ssh(self.tb.nodes[0], "pkill -TERM -f 'llamafactory-cli api api.yaml' ; sleep 2; "
                                      "pkill -KILL -f 'llamafactory-cli api api.yaml'; true", check=False)

    def llamafleet(self, port: int) -> dict:
        from llamafleet import serve

        t0 = time.monotonic()
        result = serve(self.inv, self.run_id, port=port, api_key=self.key)
        returned = time.monotonic() - t0
        if not result.ok:
            raise BenchError(f"llamafleet serve failed: {result.format()}")
        s = result.servers[0]
        status, _ = ask(s.endpoint, self.key, s.model_name)
        if status != 200:
            raise BenchError(f"llamafleet's server did not answer after serve() returned (HTTP {status})")
        return {"ready_s": time.monotonic() - t0, "serve_returned_s": returned, "endpoint": s.endpoint,
                "model": s.model_name, "server_reported_ready_s": s.ready_s}

    def latency(self, row: dict) -> None:
        times = []
        for _ in range(self.args.completions):
            status, took = ask(row["endpoint"], self.key, row["model"])
            if status != 200:
                self.errors.append(f"a completion failed (HTTP {status})")
            times.append(took)
        row["completion_s"] = times
        row["completion_median_s"] = statistics.median(times)

    def run(self) -> int:
        from llamafleet import __version__, serve_stop

        os.environ["LLAMAFLEET_STATE_DIR"] = str(self.workdir / "state")
        self.tb.up()
        self.tb.write_inventory(self.inv, extra_group_vars={"stack_offline": True})
        self.setup()
        for rnd in range(1, self.args.rounds + 1):
            order = ["by hand", "llamafleet"] if rnd % 2 else ["llamafleet", "by hand"]
            for name in order:
                port = 18100 + rnd * 2 + (name == "llamafleet")
                if name == "by hand":
                    row = self.by_hand(port)
                    self.latency(row)
                    self.stop_by_hand()
                else:
                    row = self.llamafleet(port)
                    self.latency(row)
                    serve_stop(self.inv, self.run_id)
                row["round"] = rnd
                self.rows[name].append(row)
                self.log(f"  round {rnd} {name:10}: ready {row['ready_s']:.2f} s, completion median "
                         f"{row['completion_median_s'] * 1000:.0f} ms")
        summary = {}
        for name, rows in self.rows.items():
            summary[name] = {"ready_median_s": statistics.median(r["ready_s"] for r in rows),
                             "completion_median_s": statistics.median(r["completion_median_s"] for r in rows)}
        ready = summary["llamafleet"]["ready_median_s"] / summary["by hand"]["ready_median_s"]
        lat = summary["llamafleet"]["completion_median_s"] / summary["by hand"]["completion_median_s"]
        summary["ratios"] = {"ready": ready, "completion": lat}
        # llamafleet's own cost: its readiness less the server's own (launch to the key check), per round; and
        # each round's ratio (the load time moves by seconds between rounds)
        fixed = [r["ready_s"] - r["server_reported_ready_s"] for r in self.rows["llamafleet"]]
        summary["llamafleet"]["fixed_cost_s"] = fixed
        summary["round_ratios"] = [f["ready_s"] / h["ready_s"] for f, h in zip(self.rows["llamafleet"], self.rows["by hand"])]
        self.log("")
        self.log(f"{'':12} {'ready s':>9} {'completion ms':>14}")
        for name in ("by hand", "llamafleet"):
            self.log(f"{name:12} {summary[name]['ready_median_s']:>9.2f} {summary[name]['completion_median_s'] * 1000:>14.0f}")
        self.log(f"{'ratio':12} {ready:>8.2f}x {lat:>13.2f}x   targets <= {TARGET_READY}x, <= {TARGET_LATENCY}x: "
                 f"{'PASS' if ready <= TARGET_READY else 'MISS'} / {'PASS' if lat <= TARGET_LATENCY else 'MISS'}")
        self.log(f"llamafleet's own cost (ready less the server's own), per round: "
                 + ", ".join(f"{f:.2f} s" for f in fixed) + "; ratio per round: "
                 + ", ".join(f"{r:.2f}x" for r in summary["round_ratios"]))
        doc = {"benchmark": "serve_readiness", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "llamafleet": __version__, "cpus": os.cpu_count(), "args": vars(self.args), "rows": self.rows,
               "summary": summary, "errors": self.errors}
        out = PROJECT / "bench" / "results" / f"serve_readiness-{datetime.datetime.now():%Y%m%d-%H%M}.json"
        out.write_text(json.dumps(doc, indent=2, sort_keys=True))
        self.log(f"results: {out}")
        return 1 if self.errors else 0

    def teardown(self) -> None:
        try:
            if getattr(self, "run_id", None):
                from llamafleet import serve_stop

                try:
                    serve_stop(self.inv, self.run_id)
                except Exception as exc:  # noqa: BLE001 - teardown goes on
                    print(f"teardown: {exc}", file=sys.stderr)
                self.stop_by_hand()
        finally:
            self.tb.down()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--completions", type=int, default=10)
    p.add_argument("--slot", type=int, default=6)
    p.add_argument("--stack-root", default="/tmp/lfroots/node1")
    p.add_argument("--workdir")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, sshd)", file=sys.stderr)
        return 2
    own = args.workdir is None
    if own:
        args.workdir = tempfile.mkdtemp(prefix="lfbench-serve-")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
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
