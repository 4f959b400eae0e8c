# -*- coding: utf-8 -*-
"""Benchmark helper: record when each task starts and ends on each host, as JSON lines.

Enabled only by bench/provision_noop.py's profile run (ANSIBLE_CALLBACK_PLUGINS=bench/callback_plugins,
ANSIBLE_CALLBACKS_ENABLED=lf_task_timing, LF_TASK_TIMING_FILE=<path>). Times are time.time() on the
controller, so the benchmark can line them up with the moment it started ansible-playbook.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: lf_task_timing
type: aggregate
short_description: per-task, per-host start/end times as JSON lines (llamafleet benchmark)
description: Writes one JSON object per event to the file named by LF_TASK_TIMING_FILE.
requirements: [enabled in callbacks_enabled]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "lf_task_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = os.environ.get("LF_TASK_TIMING_FILE")
        self._fh = open(path, "a") if path else None

    def _log(self, **rec):
        if self._fh:
            rec["t"] = time.time()
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def v2_playbook_on_start(self, playbook):
        self._log(ev="playbook_start")

    def v2_playbook_on_play_start(self, play):
        self._log(ev="play_start", play=play.get_name())

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._log(ev="task_start", task=task.get_name(), action=task.action, uuid=task._uuid)

    def v2_runner_on_start(self, host, task):
        self._log(ev="host_start", host=host.get_name(), task=task.get_name(), uuid=task._uuid)

    def _end(self, result, status):
        self._log(ev="host_end", host=result._host.get_name(), task=result._task.get_name(),
                  uuid=result._task._uuid, status=status)

    def v2_runner_on_ok(self, result):
        self._end(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._end(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._end(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._end(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        self._log(ev="stats")
        if self._fh:
            self._fh.close()
            self._fh = None
