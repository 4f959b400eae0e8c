# -*- coding: utf-8 -*-
"""Controller: compare every node with every other and with the lock; save the report; fail with the table.

With ``max_clock_skew_s`` (a launch, whose node check carries the inspection) the nodes' preflight
facts (clocks, drivers) are judged in the same task, so that a launch judges all nodes once. A launch's
``train_config`` also carries the plan's memory estimate (``fit``): a node whose GPUs are too small for it
is refused here, before any rank starts, with the setting that would fit."""

from __future__ import annotations

import json
import os

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import host_results
from ansible_collections.llamafleet.cluster.plugins.module_utils.rules import judged_digest

from llamafleet import fit, parity, preflight, trainconfig
from llamafleet.lock import resolve_dict


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        order = list(args["nodes"])
        found: dict[str, dict] = {}
        # Later sources win: a fresh install's own probe over the inspection made before it.
        for var in args["results_vars"]:
            for host, res in host_results(task_vars, list(task_vars["ansible_play_hosts_all"]), var).items():
                if not res.get("skipped") and "stack" in res:
                    found[host] = res
        for item in (args.get("others") or {}).get("results", []):
            if "stack" in item:
                found[item["item"]] = item
        inspections = {h: found[h] for h in order if h in found}
        problems = []
        if args.get("max_clock_skew_s") is not None:
            problems = preflight.check(stack, inspections, min_disk_gb=0.0, installing=set(),
                                       max_clock_skew_s=float(args["max_clock_skew_s"]))
        report = parity.compare(stack, inspections, gpus=args.get("gpus") or {})
        parity.save_llamafactory(args["state_dir"], stack.venv_name, inspections)
        config = args.get("train_config")
        yaml_problems = []
        if config and not config.get("allow_extra"):  # a launch: the yaml against every node's LLaMA-Factory
            hosts_of: dict[str, list[str]] = {}
            for host, res in inspections.items():
                surface = (res.get("stack") or {}).get("llamafactory") or {}
                hosts_of.setdefault(json.dumps(surface, sort_keys=True), []).append(host)
            for key, hosts in hosts_of.items():
                yaml_problems += trainconfig.check_arguments(config["path"], config["keys"], config.get("template"),
                                                             json.loads(key), "on " + ", ".join(hosts))
        # the plan's memory per GPU against every node's probed GPU memory (none on a CPU stack)
        fit_problems = [] if stack.cpu_only else fit.check_nodes((config or {}).get("fit"), parity.node_gpus(inspections))
        models: dict[str, dict] = {}
        for var in args.get("model_vars") or []:
            for host, res in host_results(task_vars, order, var).items():
                if res.get("model"):
                    models[host] = res["model"]
        if models:
            report = parity.compare_model(models, label=args.get("model_label") or "", reference=args.get("master"),
                                          report=report)
        path = parity.save_report(report, inspections, args["state_dir"])
        result.update(changed=False, report=report.to_dict(), report_path=str(path))
        failures = _failures(problems, yaml_problems, fit_problems)
        problems += yaml_problems + fit_problems
        if not report.ok:
            failures.append(report.format() + f"\nreport: {path}")
        if failures:
            result.update(failed=True, problems=problems, msg="\n".join(failures) + args.get("failure_note", ""))
        else:
            result["msg"] = report.format().splitlines()[0] + f" (report: {path})"
        if args.get("record"):
            _record(args["record"], None if failures else {h: judged_digest(r) for h, r in inspections.items()},
                    str(path))
        return result


def _failures(problems, yaml_problems, fit_problems):
    failures = ["preflight failed:\n" + "\n".join(f"- {p}" for p in problems)] if problems else []
    if yaml_problems:
        failures.append("the training yaml does not fit the nodes' LLaMA-Factory:\n"
                        + "\n".join(f"- {p}" for p in yaml_problems))
    if fit_problems:
        failures.append("a node's GPUs cannot hold the run (memory per GPU, estimated):\n"
                        + "\n".join(f"- {p}" for p in fit_problems))
    return failures


def _record(record, digests, report_path):
    """A launch judged good: its key and every node's digest (``rules.judged_digest``), which the next launch
    with the same key reuses where every node's facts are unchanged (roles/train, the one-wave start); a
    launch judged bad removes the record."""
    target = record["path"]
    if digests is None:
        if os.path.exists(target):
            os.unlink(target)
        return
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        json.dump({"key": record["key"], "nodes": digests, "report": report_path}, fh)
    os.replace(tmp, target)
