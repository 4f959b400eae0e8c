# -*- coding: utf-8 -*-
"""Controller: judge all nodes' inspections together (Python, disk, driver, clocks)."""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import host_results

from llamafleet import preflight
from llamafleet.lock import resolve_dict


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        inspections = host_results(task_vars, list(task_vars["ansible_play_hosts_all"]), args["results_var"])
        installing = {h for h, r in inspections.items() if (r.get("stack") or {}).get("status") != "ok"}
        problems = preflight.check(stack, inspections, min_disk_gb=float(args["min_disk_gb"]),
                                   max_clock_skew_s=float(args["max_clock_skew_s"]),
                                   installing=installing if args.get("installing", True) else set())
        if problems:
            result.update(failed=True, problems=problems,
                          msg="preflight failed, nothing was changed on any node:\n" + "\n".join(f"- {p}" for p in problems))
            return result
        result.update(changed=False, installing=sorted(installing),
                      platforms=preflight.platforms({h: inspections[h] for h in installing}))
        return result
