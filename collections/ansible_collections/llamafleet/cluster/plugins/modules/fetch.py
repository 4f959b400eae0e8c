#!/usr/bin/python
# -*- coding: utf-8 -*-
# A node fetches the hub models and datasets of a run, at the commits the controller pinned, into its own cache.

from __future__ import annotations

DOCUMENTATION = r"""
module: fetch
short_description: Fetch pinned hub repositories (models, datasets) into the node's llamafleet cache
description:
  - Each item is one repository at one commit (Hugging Face) or revision (ModelScope), pinned by the controller.
    An item whose copy is already complete (every file there, with the sizes the hub listed) is not fetched again.
  - The download is made by the stack venv's own hub client (huggingface_hub's C(snapshot_download), or modelscope's),
    so it honours C(endpoint) (a mirror) and resumes a file an earlier attempt left incomplete.
  - Returns the fingerprint of every item's copy (llamafleet's modelcheck), which the controller compares across nodes.
version_added: "0.2.0"
author: llamafleet developers
options:
  python:
    description: The stack venv's Python, which has the hub clients.
    type: path
    required: true
  cache_dir:
    description: The node's hub cache (Hugging Face layout); items are fetched under it.
    type: path
    required: true
  items:
    description: Repositories to fetch, each with C(name), C(hub), C(repo_type), C(repo_id), C(revision), C(commit),
      C(cache_subdir) (where its copy is, under C(cache_dir)), C(files) (path to size, from the hub) and C(model)
      (check it is a loadable model directory).
    type: list
    elements: dict
    required: true
  endpoint:
    description: The Hugging Face endpoint (HF_ENDPOINT, e.g. a mirror).
    type: str
    default: https://huggingface.co
  token:
    description: The hub token (HF_TOKEN); never logged.
    type: str
  timeout_s:
    description: Seconds one repository may take to fetch.
    type: int
    default: 86400
"""

EXAMPLES = r"""
- name: Fetch the run's hub model
  llamafleet.cluster.fetch:
    python: /srv/llamafleet/stacks/current/bin/python
    cache_dir: /srv/llamafleet/cache/huggingface/hub
    items: "{{ plan.hub }}"
"""

RETURN = r"""
items:
  description: Per item name, its path on the node, the bytes fetched, the seconds it took and its fingerprint.
  returned: always
  type: dict
"""

import json
import os
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llamafleet.cluster.plugins.module_utils.modelcheck import fingerprint

# Run by the venv's Python, the spec (token included) on stdin: never on a command line.
DOWNLOAD = r"""
import json, sys
spec = json.load(sys.stdin)
if spec["hub"] == "modelscope":
    from modelscope import snapshot_download
    kind = {"repo_type": spec["repo_type"]} if spec["repo_type"] != "model" else {}
    path = snapshot_download(spec["repo_id"], revision=spec["revision"], local_dir=spec["dest"], **kind)
else:
    from huggingface_hub import snapshot_download
    path = snapshot_download(spec["repo_id"], repo_type=spec["repo_type"], revision=spec["commit"],
                             cache_dir=spec["cache_dir"], endpoint=spec["endpoint"], token=spec["token"])
print(json.dumps({"path": path}))
"""


def _tree_bytes(path):
    total = 0
    for top, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def _fetch(module, p, item, dest):
    """Download one item; return the bytes it added to the cache."""
    store = os.path.dirname(os.path.dirname(dest)) if item["hub"] == "huggingface" else dest
    before = _tree_bytes(store)
    spec = dict(item, cache_dir=p["cache_dir"], dest=dest, endpoint=p["endpoint"], token=p["token"] or None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                    "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONNOUSERSITE="1",
               HF_HUB_DOWNLOAD_TIMEOUT="60")
    try:
        proc = subprocess.run([p["python"], "-I", "-c", DOWNLOAD], input=json.dumps(spec), capture_output=True,
                              text=True, env=env, timeout=p["timeout_s"])
    except subprocess.TimeoutExpired:
        module.fail_json(msg="fetching %s took longer than %d s; run train again to resume it"
                         % (item["repo_id"], p["timeout_s"]))
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
        module.fail_json(msg="fetching %s@%s from %s failed: %s; run train again to resume it (check HF_ENDPOINT, "
                             "HF_TOKEN and the node's access to the hub, or set train_hub_fetch: controller)"
                             % (item["repo_id"], (item.get("commit") or item["revision"])[:12], p["endpoint"],
                                " / ".join(tail)))
    return max(0, _tree_bytes(store) - before)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            python=dict(type="path", required=True),
            cache_dir=dict(type="path", required=True),
            items=dict(type="list", elements="dict", required=True),
            endpoint=dict(type="str", default="https://huggingface.co"),
            token=dict(type="str", no_log=True),
            timeout_s=dict(type="int", default=86400),
        ),
        supports_check_mode=False,
    )
    p = module.params
    out, changed = {}, False
    for item in p["items"]:
        dest = os.path.join(p["cache_dir"], item["cache_subdir"])
        fp = fingerprint(dest, item.get("files") or None, model=item.get("model", False))
        moved, started = 0, time.time()
        if not fp["present"] or fp["problems"]:
            moved = _fetch(module, p, item, dest)
            changed = True
            fp = fingerprint(dest, item.get("files") or None, model=item.get("model", False))
        out[item["name"]] = {"path": dest, "bytes_fetched": moved, "seconds": round(time.time() - started, 2),
                             "fingerprint": fp}
    model = next((out[i["name"]]["fingerprint"] for i in p["items"] if i.get("model")), None)
    module.exit_json(changed=changed, items=out, model=model)


if __name__ == "__main__":
    main()
