# -*- coding: utf-8 -*-
"""Controller: follow a started run until it ends, stopping every rank when one fails (train.yml's last step)."""

from __future__ import annotations

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401

from llamafleet import training

display = Display()


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        a = self._task.args
        sources = a["inventory"] if isinstance(a["inventory"], list) else [a["inventory"]]
        extra = {"llamafleet_state_dir": a["state_dir"]}
        if a.get("lock_file"):
            extra["llamafleet_lock_file"] = a["lock_file"]
        if a.get("flavor"):
            extra["llamafleet_flavor"] = a["flavor"]

        def show(status):
            display.display(status.format_line())

        outcome = training.follow(sources[0], a["run_id"], extravars=extra, poll_s=float(a["poll_s"]), on_status=show)
        result.update(changed=False, result=outcome.to_dict(), msg=outcome.format())
        if not outcome.ok:
            result["failed"] = True
        return result
