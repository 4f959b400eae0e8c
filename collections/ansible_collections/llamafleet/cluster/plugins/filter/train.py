# -*- coding: utf-8 -*-
"""A launch across nodes: the transfers the sync action makes, which nodes did not start, and why; the
secret part of train_env and the run id / job name checks, by the llamafleet package's one rule each."""

from __future__ import annotations

import hashlib
import json

from ansible.module_utils.parsing.convert_bool import boolean

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401

from llamafleet.launchplan import split_secrets
from llamafleet.names import name_problem
from llamafleet.preflight import clock_bounds


def secret_env(env):
    """The variables of ``env`` whose values are secrets (``launchplan.is_secret``), as strings: for the
    train module's no_log option only; the plan holds ``***`` for them."""
    return split_secrets(env if isinstance(env, dict) else {})[1]


def name_problems(values, required=()):
    """One message per run id or job name of ``values`` (setting name to value) that cannot name a
    directory (``names.name_problem``); empty values (= the default) pass, except those ``required`` (the
    verbs that act on one existing run: status, stop, collect)."""
    missing = ["%s is empty: name the run (-e %s=<run id>; the controller's runs are in <state_dir>/runs)" % (k, k)
               for k in required if values.get(k) in (None, "")]
    return missing + [p for p in (name_problem(v, k) for k, v in values.items() if v not in (None, "")) if p]


def _starts(hostvars, hosts):
    """Each host's start result (``__train_start``), None where the start did not run (or was skipped)."""
    out = {}
    for host in hosts:
        res = hostvars[host].get("__train_start")
        out[host] = None if res is None or res.get("skipped") else res
    return out


def fast_fell_back(hostvars, hosts):
    """True when the one-wave start (``fast_digest``) ran on every host and every host fell back, nothing
    started anywhere: the launch goes on with the check, the judgement and the start (roles/train full.yml)."""
    starts = _starts(hostvars, hosts)
    return bool(starts) and all(res is not None and res.get("fallback") for res in starts.values())


def failed_starts(hostvars, hosts):
    """``host: reason`` for every host whose start failed or that could not be reached; empty when the start
    ran nowhere (the launch failed before it: the check, a transfer) or the one-wave start fell back everywhere."""
    starts = _starts(hostvars, hosts)
    if all(res is None for res in starts.values()) or fast_fell_back(hostvars, hosts):
        return []
    out = []
    for host, res in starts.items():
        if res is None:
            out.append(f"{host}: not started (the node dropped out of the play)")
        elif res.get("unreachable"):
            out.append(f"{host}: unreachable: {res.get('msg', '')}".strip())
        elif res.get("fallback") and not res.get("run"):
            out.append(f"{host}: did not start while other nodes did ({res['fallback']})")
        elif res.get("failed") or (res.get("msg") and not res.get("run")):
            out.append(f"{host}: {res.get('msg', 'did not start')}")
    return out


def judgment_key(train, llamafleet, max_clock_skew_s):
    """What a launch judgement depends on besides the nodes' own facts (the lock, the cluster, the yaml's
    arguments, the model, the clock allowance), as one digest; of the plan (``train``: the train_plan action's
    result) and the validated cluster (``llamafleet``: the validate action's)."""
    value = {"stack": llamafleet["stack"], "nodes": llamafleet["cluster"]["nodes"],
             "master": llamafleet["cluster"]["master"], "gpus": llamafleet["gpus"],
             "arguments": train["plan"]["arguments"], "model": train["plan"]["model"]["label"],
             "max_clock_skew_s": max_clock_skew_s}
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def one_wave_digests(train, llamafleet, settings, path, hosts):
    """Each host's digest from the last launch judged good, when this launch can start in one wave (one task per
    node: roles/train launch_all.yml); else empty. Not with train_fast false, nor for a resumed run (it copies a
    checkpoint), a hub model (judged after its fetch), shared output or the fabric check (steps of their own), nor
    when the last judgement was on another key or did not judge every one of ``hosts``."""
    plan = train["plan"]
    if (not boolean(settings["train_fast"], strict=False) or settings["train_run_id"]
            or plan["model"]["source"] == "hub" or plan.get("shared_output_dir")
            or boolean(settings["train_fabric"], strict=False)):
        return {}
    return judged(path, judgment_key(train, llamafleet, settings["preflight_max_clock_skew_s"]), hosts)


def judged(path, key, hosts):
    """Each host's digest from the last launch judged good (``action/parity.py`` records it), when that launch
    had the same ``key`` and judged every one of ``hosts``; else empty (no one-wave start)."""
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return {}
    nodes = record.get("nodes") if isinstance(record, dict) and record.get("key") == key else None
    if not isinstance(nodes, dict) or any(not nodes.get(h) for h in hosts):
        return {}
    return {h: nodes[h] for h in hosts}


def inputs_transfers(hostvars, plan, hosts, results_var="__train_prepared"):
    """One phase of the sync action: the staged inputs to the inputs directory of every host whose check
    (``results_var``) found files that differ from the manifest. Nodes already holding them are left alone."""
    return [[{"host": h, "src": plan["stage_dir"], "dest": plan["nodes"][h]["inputs_dir"]} for h in hosts
             if (hostvars[h].get(results_var) or {}).get("inputs_differ", True)]]


def collect_transfers(hostvars, hosts, run_id, state_dir, excludes=()):
    """One phase: every host's run directory pulled into the controller's copy of the run (never deleting).

    Rank 0 writes the outputs (adapter, trainer log, loss plot, results), so only the master's output
    directory is collected, even when it is a link to a shared one; the other ranks write only their part
    of a checkpoint, which is never collected."""
    def master(h):
        return str(hostvars[h].get("llamafleet_master", False)).lower() in ("true", "1", "yes")
    return [[{"host": h, "src": "%s/runs/%s" % (hostvars[h]["llamafleet_root"], run_id),
              "dest": "%s/runs/%s/nodes/%s" % (state_dir, run_id, h), "pull": True, "delete": False,
              "copy_unsafe_links": master(h), "excludes": list(excludes) + ([] if master(h) else ["/output"])}
             for h in hosts]]


def lacking_hub(hostvars, hosts, results_var="__train_prepared"):
    """The hosts whose check (``results_var``) found hub repositories missing from their cache (fetch.yml)."""
    return [h for h in hosts if (hostvars[h].get(results_var) or {}).get("hub_missing")]


class FilterModule:
    def filters(self):
        return {"failed_starts": failed_starts, "lacking_hub": lacking_hub, "fast_fell_back": fast_fell_back,
                "judgment_key": judgment_key,
                "clock_bounds": lambda skew: list(clock_bounds(skew)), "inputs_transfers": inputs_transfers,
                "collect_transfers": collect_transfers,
                "secret_env": secret_env, "name_problems": name_problems}
