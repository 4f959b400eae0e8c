# -*- coding: utf-8 -*-
"""Controller: every pin of the lock exists on the package index, asked once per lock hash."""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401  (makes llamafleet importable)

from llamafleet import pins
from llamafleet.lock import resolve_dict


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        stack = resolve_dict(args["stack"])
        sources = [s for s in [args.get("index_url") or stack.pip.index_url or pins.DEFAULT_INDEX,
                               *(args.get("extra_index_urls") or stack.pip.extra_index_urls),
                               *(args.get("find_links") or stack.pip.find_links)] if s]
        try:
            missing = pins.verify_cached(stack, args["cache_dir"], sources)
        except OSError as exc:
            result.update(failed=True, msg=f"could not reach the package index to verify the lock's pins ({exc}): "
                                           "check the controller's network, or use offline mode (stack_offline: true, or "
                                           "llamafleet provision --offline)")
            return result
        if missing:
            result.update(failed=True, missing=missing,
                          msg=f"the stack lock {stack.lock_file} pins versions that do not exist on the package index "
                              f"({', '.join(sources)}): {', '.join(missing)}. Fix these pins in the lock; nothing was installed.")
            return result
        result.update(changed=False)
        return result
