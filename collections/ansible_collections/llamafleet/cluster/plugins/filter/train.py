# -*- coding: utf-8 -*-
"""Judging a launch across nodes: which nodes did not start, and why."""

from __future__ import annotations


def failed_starts(hostvars, hosts):
    """``host: reason`` for every host whose start failed or that could not be reached."""
    out = []
    for host in hosts:
        res = hostvars[host].get("__train_start")
        if res is None:
            out.append(f"{host}: not started (the node dropped out of the play)")
        elif res.get("unreachable"):
            out.append(f"{host}: unreachable: {res.get('msg', '')}".strip())
        elif res.get("failed") or (res.get("msg") and not res.get("run")):
            out.append(f"{host}: {res.get('msg', 'did not start')}")
    return out


class FilterModule:
    def filters(self):
        return {"failed_starts": failed_starts}
