"""Preflight: judge every node's inspection together, before anything is installed anywhere.

Per node: an interpreter of the lock's Python minor, enough free disk, a driver new enough for the
flavor's CUDA, rsync new enough for the transfers. Across nodes: clocks within a few seconds of each other and of the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .lock import Stack
from .parity import version_tuple

# llamafleet's transfers use rsync --mkpath (3.2.3) on both ends
RSYNC_MIN = "3.2.3"


def check(stack: Stack, inspections: Mapping[str, Mapping[str, Any]], *, min_disk_gb: float,
          max_clock_skew_s: float, installing: set[str], max_trip_s: float = 30.0) -> list[str]:
    """Problems found, each naming the host, what is wrong and the fix. ``installing`` are the nodes
    whose venv will be built; ``max_trip_s`` bounds how long a task takes to reach a node."""
    problems: list[str] = []
    for host, insp in inspections.items():
        node = insp.get("node") or {}
        interp = node.get("interpreter") or {}
        if host in installing:
            if not interp.get("path"):
                problems.append(f"{host}: no {interp.get('name')} found on the node: install Python {stack.python} "
                                f"there (e.g. apt-get install python{stack.python}-venv) or set llamafleet_python to its path")
            elif not interp.get("version") or ".".join(interp["version"].split(".")[:2]) != stack.python:
                problems.append(f"{host}: llamafleet_python {interp.get('path')} is Python {interp.get('version')}, the lock "
                                f"({stack.lock_file}) asks for {stack.python}: point llamafleet_python at a Python "
                                f"{stack.python} interpreter")
            free = float(node.get("disk_free_gb") or 0)
            if free < min_disk_gb:
                problems.append(f"{host}: only {free:.1f} GiB free at {node.get('disk_path')} (llamafleet_root's disk); "
                                f"a stack needs {min_disk_gb:g} GiB (preflight_min_disk_gb): free space or move llamafleet_root")
        if stack.npu and not node.get("npu_driver"):
            problems.append(f"{host}: no Ascend driver answers (npu-smi info) but flavor {stack.flavor} runs on NPUs: "
                            "install the Ascend driver and CANN, or use another flavor")
        if stack.cuda:
            driver = node.get("driver")
            if not driver:
                problems.append(f"{host}: no NVIDIA driver answers (nvidia-smi) but flavor {stack.flavor} runs on "
                                f"{stack.cuda_label}: install a driver >= {stack.driver_min or 'its minimum'} or use the "
                                "cpu flavor")
            elif stack.driver_min and version_tuple(driver) < version_tuple(stack.driver_min):
                problems.append(f"{host}: NVIDIA driver {driver} is older than {stack.driver_min}, which {stack.cuda_label} "
                                "needs: upgrade the driver (llamafleet checks drivers, never installs them)")
        if "rsync" in node:
            rsync = node.get("rsync")
            if not rsync:
                problems.append(f"{host}: no rsync on the node; llamafleet copies inputs, wheels and outputs with it: "
                                f"install rsync >= {RSYNC_MIN} (apt-get install rsync)")
            elif version_tuple(rsync) < version_tuple(RSYNC_MIN):
                problems.append(f"{host}: rsync {rsync} is older than {RSYNC_MIN}, which llamafleet's transfers need "
                                "(--mkpath): upgrade rsync on the node")
        offset = node.get("clock_offset_s")
        low, high = clock_bounds(max_clock_skew_s, max_trip_s)
        if offset is not None and not (low <= offset <= high):
            problems.append(f"{host}: clock is {offset:+.1f} s off the controller's (allowed {max_clock_skew_s:g} s, "
                            "preflight_max_clock_skew_s): enable NTP/chrony on the node")
    return problems


def platforms(inspections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The wheel platforms of these nodes: per machine, the lowest glibc among them and the hosts. An
    offline wheelhouse built for it installs on every one of them."""
    out: dict[str, dict[str, Any]] = {}
    for host, insp in sorted(inspections.items()):
        pf = (insp.get("node") or {}).get("platform") or {}
        if not pf.get("machine"):
            continue
        entry = out.setdefault(pf["machine"], {"glibc": pf.get("glibc"), "hosts": []})
        entry["hosts"].append(host)
        if pf.get("glibc") and (not entry["glibc"] or version_tuple(pf["glibc"]) < version_tuple(entry["glibc"])):
            entry["glibc"] = pf["glibc"]
    return out


def clock_bounds(max_clock_skew_s: float, max_trip_s: float = 30.0) -> tuple[float, float]:
    """The clock offsets a node's check may report (its time minus the controller's when the task was sent).
    The offset includes the task's trip from the controller (>= 0 for a good clock): a clock behind is caught to
    the second, one ahead once it exceeds the allowance plus the trip. The one-wave launch's node checks its own
    offset against these (roles/train)."""
    return -float(max_clock_skew_s), float(max_clock_skew_s) + float(max_trip_s)
