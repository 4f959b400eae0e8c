# -*- coding: utf-8 -*-
"""Controller: plan a node-to-node fan-out (manifest, id, secret), stream it into the chain's first node, or
forget its secret (the transfer is over, however it ended)."""

from __future__ import annotations

import os

from ansible.plugins.action import ActionBase

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401  (makes llamafleet importable)
from ansible_collections.llamafleet.cluster.plugins.filter.transfer import ssh_command
from ansible_collections.llamafleet.cluster.plugins.module_utils import fanout as protocol

from llamafleet import fanout
from llamafleet.errors import LlamafleetError

SSH_KEYS = ("ansible_host", "ansible_port", "ansible_user", "ansible_ssh_private_key_file", "ansible_ssh_common_args",
            "ansible_ssh_extra_args", "inventory_hostname")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = self._task.args
        try:
            if args.get("state", "send") == "plan":
                return self._plan(result, args)
            if args.get("state") == "forget":  # in this process: no module run for an unlink
                if os.path.exists(args["secret_file"]):
                    os.unlink(args["secret_file"])
                result.update(changed=False, bookkeeping=True)  # the runner keeps the send's result
                return result
            return self._send(result, args, task_vars)
        except LlamafleetError as exc:
            result.update(failed=True, msg="; ".join(exc.problems), error="; ".join(exc.problems))
            return result

    @staticmethod
    def _plan(result, args):
        state = args["state_dir"]
        if not args.get("src"):  # a node sends (fanout_from): the transfer's id and secret only
            files = {}
        elif args.get("hashes"):  # hashed already (the training plan's manifest): only the sizes are read
            files = fanout.sized(args["src"], args["hashes"])
        else:
            files = fanout.manifest(args["src"], os.path.join(state, "cache", "fanout-manifest-%s.json"
                                                            % os.path.basename(os.path.normpath(args["src"]))))
        tid, secret_file = fanout.new_transfer(state)
        result.update(changed=False, transfer_id=tid, secret_file=secret_file, manifest=files,
                      bytes=sum(f["size"] for f in files.values()), files=len(files))
        return result

    def _send(self, result, args, task_vars):
        received = fanout.receivers(task_vars["hostvars"], args["hosts"], args["register"])
        try:
            if not received:
                result.update(changed=False, bytes=0, chain=[])
                return result
            chain, entries = fanout.chain_and_files(received, args["manifest"])
            head = received[0]["name"]
            hv = task_vars["hostvars"][head]
            hostvars = {k: self._templar.template(hv[k]) for k in SSH_KEYS if k in hv}
            ssh, target = ssh_command(hostvars)
            sent = fanout.send([*ssh, target], received[0]["relay"], received[0]["python"], chain, entries,
                               args["src"], args["secret_file"], protocol)
        finally:
            if os.path.exists(args["secret_file"]):
                os.unlink(args["secret_file"])  # one transfer, one secret: gone when it is done
        result.update(changed=True, files=len(entries), **sent)
        return result
