# -*- coding: utf-8 -*-
"""Controller: judge every node's pre-launch check together: preflight (disk, driver, clocks) and parity
(every node against every other and against the lock), in one task, before any rank starts."""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import host_results

from llamafleet import parity, preflight
from llamafleet.lock import resolve_dict


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        order = list(args["nodes"])
        found = {h: r for h, r in host_results(task_vars, list(task_vars["ansible_play_hosts_all"]), args["results_var"]).items()
                 if "stack" in r}
        inspections = {h: found[h] for h in order if h in found}
        problems = preflight.check(stack, inspections, min_disk_gb=0.0, max_clock_skew_s=float(args["max_clock_skew_s"]),
                                   installing=set())
        report = parity.compare(stack, inspections, gpus=args.get("gpus") or {})
        path = parity.save_report(report, inspections, args["state_dir"])
        result.update(changed=False, report=report.to_dict(), report_path=str(path))
        msgs = []
        if problems:
            msgs.append("preflight failed:\n" + "\n".join(f"- {p}" for p in problems))
        if not report.ok:
            msgs.append(report.format() + f"\nreport: {path}")
        if msgs:
            result.update(failed=True, problems=problems,
                          msg="\n".join(msgs) + "\nnothing was started on any node")
        else:
            result["msg"] = report.format().splitlines()[0] + f" (report: {path})"
        return result
