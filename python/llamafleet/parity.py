"""Parity: every node compared with every other node and with the lock, component by component.

Input is what the ``llamafleet.cluster.node`` module reported per node (its ``node`` and ``stack``
keys, or the train module's ``prepared`` check, which carries the same); output is a ``ParityReport``
that ``save_report`` writes as JSON and the CLI prints.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .lock import Stack
from .rules import BASELINE, package_drift, version_matches

MISSING = "-"


def version_tuple(v: str) -> tuple[int, ...]:
    """Numeric parts of a version, for ordering driver versions such as 580.159.04."""
    out = []
    for part in v.split("."):
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Row:
    component: str
    expected: str
    found: dict[str, str]  # node -> value
    bad: tuple[str, ...]  # nodes whose value is wrong
    why: str = ""

    @property
    def ok(self) -> bool:
        return not self.bad


@dataclasses.dataclass(frozen=True)
class ParityReport:
    ok: bool
    lock_file: str
    flavor: str
    stack_hash: str
    nodes: tuple[str, ...]
    rows: tuple[Row, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for r, row in zip(d["rows"], self.rows):
            r["ok"] = row.ok
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParityReport":
        rows = tuple(Row(component=r["component"], expected=r["expected"], found=dict(r["found"]),
                         bad=tuple(r["bad"]), why=r.get("why", "")) for r in d["rows"])
        return cls(ok=d["ok"], lock_file=d["lock_file"], flavor=d["flavor"], stack_hash=d["stack_hash"],
                   nodes=tuple(d["nodes"]), rows=rows, problems=tuple(d["problems"]), warnings=tuple(d["warnings"]))

    def table(self, only_problems: bool = False) -> str:
        """Plain-text table, component x node, a '!' after every value that is wrong."""
        rows = [r for r in self.rows if not (only_problems and r.ok)]
        head = ["component", "expected"] + list(self.nodes)
        body = [[r.component, r.expected] + [r.found.get(n, MISSING) + (" !" if n in r.bad else "") for n in self.nodes]
                for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
        fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        return "\n".join(lines)

    def format(self) -> str:
        if self.ok:
            text = f"parity OK: {len(self.nodes)} nodes match the lock ({self.flavor}, stack-{self.stack_hash})\n"
            text += self.table()
        else:
            text = f"parity FAILED: {len(self.problems)} problem(s) across {len(self.nodes)} nodes\n"
            text += self.table(only_problems=True) + "\n" + "\n".join(f"- {p}" for p in self.problems)
        if self.warnings:
            text += "\n" + "\n".join(f"warning: {w}" for w in self.warnings)
        return text


class _Builder:
    """Rows, problems and warnings of a report being made; ``add`` turns every bad cell into a problem."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def add(self, component: str, expected: str, found: dict[str, str], bad: Sequence[str],
            why: str | Mapping[str, str] = "") -> None:
        """``why``: one reason for every bad node, or each bad node's own."""
        self.rows.append(Row(component, expected, found, tuple(bad), why if isinstance(why, str) else ""))
        for b in bad:
            reason = why if isinstance(why, str) else why.get(b, "")
            self.problems.append(f"{b}: {component} is {found.get(b, MISSING)}, expected {expected}{reason}")


def compare(stack: Stack, inspections: Mapping[str, Mapping[str, Any]], gpus: Mapping[str, int] | None = None) -> ParityReport:
    """Compare the nodes' inspections (``{node: {"node": ..., "stack": ...}}``) with each other and the lock."""
    nodes = tuple(inspections)
    b = _Builder()
    probes: dict[str, dict[str, Any]] = {}
    for n in nodes:
        st = inspections[n].get("stack") or {}
        probe = st.get("probe") or {}
        if st.get("status") in (None, "absent", "incomplete") or "error" in probe:
            b.problems.append(f"{n}: no complete stack venv at {st.get('path', '?')} "
                              f"({probe.get('error') or st.get('status')}); run provision for this node")
            probe = {}
        probes[n] = probe
    live = [n for n in nodes if probes[n]]
    built = {n: (inspections[n].get("stack") or {}).get("built") or {} for n in live}
    _python_rows(b, stack, probes, live)
    _package_rows(b, stack, probes, live, built)
    _cuda_rows(b, stack, probes, live)
    facts = {n: inspections[n].get("node") or {} for n in nodes}
    _toolchain_rows(b, stack, facts)
    if stack.npu:
        _npu_rows(b, stack, facts, gpus or {})
    if stack.cuda:
        _gpu_rows(b, stack, facts, gpus or {})
    for n in live:
        st = inspections[n].get("stack") or {}
        if st.get("stripped_present"):
            b.add("stripped files", "absent", {n: f"{len(st['stripped_present'])} present"}, [n],
                  f" (the {stack.flavor} flavor deletes them; run provision to repair)")
    return ParityReport(ok=not b.problems, lock_file=stack.lock_file, flavor=stack.flavor, stack_hash=stack.hash,
                        nodes=nodes, rows=tuple(b.rows), problems=tuple(b.problems), warnings=tuple(b.warnings))


def _python_rows(b: _Builder, stack: Stack, probes: Mapping[str, dict[str, Any]], live: list[str]) -> None:
    """The minor must be the lock's on every node; patch releases that differ are a warning."""
    found = {n: probes[n].get("python", MISSING) for n in live}
    bad = [n for n in live if ".".join(found[n].split(".")[:2]) != stack.python]
    b.add("python", stack.python, found, bad, " (the lock's Python minor)")
    patches = set(found.values())
    if not bad and len(patches) > 1:
        b.warnings.append(f"python patch releases differ between nodes: {', '.join(sorted(patches))}")


def _package_rows(b: _Builder, stack: Stack, probes: Mapping[str, dict[str, Any]], live: list[str],
                  built: Mapping[str, Mapping[str, str]]) -> None:
    """The lock's components first, in its order, then every package that is wrong anywhere. A pinned package
    is wrong where the node's own rule says so (rules.package_drift: the pin, and the build provision
    installed); pinned packages that still differ between nodes are wrong where they differ from most."""
    expected = stack.packages
    installed = {n: probes[n].get("packages", {}) for n in live}
    drift = {n: set(package_drift(expected, installed[n], built.get(n))) for n in live}
    local = {n: set(probes[n].get("local_packages", installed[n])) for n in live}
    names = list(stack.components)
    everything = set(expected).union(*(set(installed[n]) for n in live))
    names += sorted(everything - set(names) - BASELINE)
    for name in names:
        pin = expected.get(name)
        found = {n: installed[n].get(name, MISSING) for n in live}
        if pin is None:
            # a system flavor's venv sees its base image: a package of the image the lock does not list must
            # only be the same on every node (checked below); one installed in the venv itself is wrong
            bad = [n for n in live if found[n] != MISSING and (name in local[n] or stack.torch_mode != "system")]
            why = " (the lock does not list this package)"
        else:
            bad = [n for n in live if name in drift[n]]
            why = {n: " (another build than provision installed; run provision to repair)"
                   for n in bad if version_matches(pin, found[n])}
        if not bad and len(set(found.values())) > 1:
            values = list(found.values())
            common = max(values, key=values.count)
            bad, why = [n for n in live if found[n] != common], " (nodes differ)"  # same pin, other builds
        if name in stack.components or bad:
            b.add(name, pin or "not installed", found, bad, why)


def _cuda_rows(b: _Builder, stack: Stack, probes: Mapping[str, dict[str, Any]], live: list[str]) -> None:
    """torch's CUDA and NCCL, from the probe: what the flavor says they must be."""
    found = {n: str(probes[n].get("torch_cuda") or "none") for n in live if "torch" in probes[n].get("packages", {})}
    if found and stack.cuda == "system":
        # the base image's CUDA: whatever it is, the same on every node, and a CUDA build
        values = sorted(found.values())
        common = max(set(values) - {"none"}, key=values.count, default="none")
        bad = [n for n, v in found.items() if v == "none" or v != common]
        b.add("torch.version.cuda", f"{common} on every node (the image's)" if common != "none" else "a CUDA build",
              found, bad, f" (flavor {stack.flavor}: the image's torch must be a CUDA build, the same everywhere)")
    elif found:
        exp = stack.cuda or "none"
        b.add("torch.version.cuda", exp, found, [n for n, v in found.items() if v != exp], f" (flavor {stack.flavor})")
    nccl_pkg = next((p for p in stack.packages if p.startswith("nvidia-nccl-")), None)
    found = {}
    for n in live:
        pr = probes[n]
        v = pr.get("nccl_torch") or next((v for k, v in pr.get("packages", {}).items() if k.startswith("nvidia-nccl-")), None)
        found[n] = v or "none"
    if any(v != "none" for v in found.values()) or nccl_pkg:
        bad = [n for n in live if found[n] != found[live[0]]] if live else []
        b.add("nccl", stack.packages.get(nccl_pkg, "same on all nodes") if nccl_pkg else "same on all nodes", found, bad,
              " (nodes differ)")


def _toolchain_rows(b: _Builder, stack: Stack, facts: Mapping[str, Mapping[str, Any]]) -> None:
    found = {n: str(facts[n].get("nvcc") or "none") for n in facts}
    if stack.nvcc:
        b.rows.append(Row("nvcc", stack.nvcc, found, ()))
        for n in (n for n in facts if found[n] != stack.nvcc):
            # DeepSpeed only compiles ops (FusedAdam, CPU Adam) with it: warn, do not block
            b.warnings.append(f"{n}: nvcc is {found[n]}, the {stack.flavor} flavor expects {stack.nvcc} "
                              "(needed only for DeepSpeed's compiled optimizers; install the CUDA toolkit to match)")
    elif len(set(found.values())) > 1:
        b.rows.append(Row("nvcc", "same on all nodes", found, ()))
        b.warnings.append("nvcc differs between nodes: " + ", ".join(f"{n}={v}" for n, v in found.items()))


def _npu_rows(b: _Builder, stack: Stack, facts: Mapping[str, Mapping[str, Any]], gpus: Mapping[str, int]) -> None:
    nodes = list(facts)
    found = {n: str(facts[n].get("npu_driver") or "none") for n in nodes}
    bad = [n for n in nodes if found[n] == "none" or found[n] != found[nodes[0]]]
    b.add("npu driver", "same on all nodes", found, bad, " (npu-smi; the same Ascend driver on every node)")
    found = {n: str(facts[n].get("cann") or "none") for n in nodes}
    bad = [n for n in nodes if found[n] == "none" or (found[n] != stack.cann if stack.cann else found[n] != found[nodes[0]])]
    b.add("cann", stack.cann or "same on all nodes", found, bad, " (the CANN toolkit; install the one the flavor names)")
    found = {n: f"{len(facts[n].get('npus') or [])} x {(facts[n].get('npus') or [{}])[0].get('name')}"
             if facts[n].get("npus") else "0" for n in nodes}
    bad = [n for n in nodes if len(facts[n].get("npus") or []) < int(gpus.get(n, 1))]
    b.add("npus", "llamafleet_gpus", found, bad, " (fewer NPUs than the inventory's llamafleet_gpus)")


def _gpu_rows(b: _Builder, stack: Stack, facts: Mapping[str, Mapping[str, Any]], gpus: Mapping[str, int]) -> None:
    nodes = list(facts)
    found = {n: str(facts[n].get("driver") or "none") for n in nodes}
    bad = [n for n in nodes if found[n] == "none"
           or (stack.driver_min and version_tuple(found[n]) < version_tuple(stack.driver_min))]
    b.add("nvidia driver", f">= {stack.driver_min or 'any'}", found, bad,
          f" ({stack.cuda_label} needs it; upgrade the driver, llamafleet never installs one)")
    found = {}
    for n in nodes:
        g = facts[n].get("gpus") or []
        found[n] = f"{len(g)} x {g[0]['name']} ({g[0]['memory_mib']} MiB)" if g else "0"
    bad = [n for n in nodes if len(facts[n].get("gpus") or []) < int(gpus.get(n, 1))]
    b.add("gpus", "llamafleet_gpus", found, bad, " (fewer GPUs than the inventory's llamafleet_gpus)")
    models = {(facts[n].get("gpus") or [{}])[0].get("name") for n in nodes}
    if len(models) > 1:
        b.warnings.append("GPU models differ between nodes: " + ", ".join(sorted(str(m) for m in models)))


def node_gpus(inspections: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each node's accelerators as its probe listed them (``[{"name", "memory_mib"}]``: its GPUs, else its NPUs),
    for the launch judgement's check that the run's memory per GPU fits (``fit.check_nodes``)."""
    out = {}
    for n, insp in inspections.items():
        facts = insp.get("node") or {}
        out[n] = list(facts.get("gpus") or facts.get("npus") or [])
    return out


def compare_model(fingerprints: Mapping[str, Mapping[str, Any]], *, label: str, reference: str,
                  report: ParityReport) -> ParityReport:
    """``report`` with the model compared across nodes (``fingerprints``: node -> what the node's
    ``modelcheck.fingerprint`` found): a node whose copy is incomplete, or whose files differ from the
    ``reference`` node's (size, sha256 of a small file, safetensors header), fails it, file by file."""
    nodes = [n for n in report.nodes if n in fingerprints]
    if not nodes:
        return report
    rows, problems = list(report.rows), list(report.problems)
    ref = reference if reference in fingerprints else nodes[0]
    for n in nodes:
        for p in fingerprints[n].get("problems") or ():
            problems.append(f"{n}: model {label}: {p}")
    files = sorted({f for n in nodes for f in (fingerprints[n].get("files") or {})})
    for f in files:
        found = {n: _short((fingerprints[n].get("files") or {}).get(f)) for n in nodes}
        bad = [n for n in nodes if found[n] != found[ref]]
        if bad:
            rows.append(Row(f"model: {f}", f"as on {ref}", found, tuple(bad), " (the nodes hold different models)"))
            problems += [f"{b}: model file {f} is {found[b]}, on {ref} it is {found[ref]}" for b in bad]
    total = {n: f"{len(fingerprints[n].get('files') or {})} files, {(fingerprints[n].get('bytes') or 0) / 2**20:.1f} MiB"
             for n in nodes}
    broken = tuple(n for n in nodes if fingerprints[n].get("problems"))
    rows.append(Row(f"model {label}", "complete, same on all nodes", total, broken))
    return dataclasses.replace(report, ok=not problems, rows=tuple(rows), problems=tuple(problems))


def _short(value: str | None) -> str:
    """A file's fingerprint for the table: its size and the first characters of its digest."""
    if value is None:
        return MISSING
    size, _, digest = value.partition(" ")
    return f"{size} B" + (f" {digest.split(':', 1)[1][:8]}" if digest else "")


def _llamafactory_path(state_dir: str | os.PathLike, venv_name: str) -> Path:
    return Path(state_dir) / "stacks" / f"{venv_name}.llamafactory.json"


def save_llamafactory(state_dir: str | os.PathLike, venv_name: str,
                      inspections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Keep what the nodes' LLaMA-Factory accepts (version, argument names, templates), as a node's probe
    reported it, so that a later plan checks a yaml before any node is contacted (``load_llamafactory``)."""
    found = next((st["llamafactory"] for r in inspections.values() if (st := r.get("stack") or {}).get("llamafactory")
                  and "args" in st["llamafactory"]), None)
    if found:
        path = _llamafactory_path(state_dir, venv_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found))
    return found


def load_llamafactory(state_dir: str | os.PathLike, venv_name: str) -> dict[str, Any] | None:
    try:
        return json.loads(_llamafactory_path(state_dir, venv_name).read_text())
    except (OSError, ValueError):
        return None


def save_report(report: ParityReport, inspections: Mapping[str, Mapping[str, Any]], state_dir: str | os.PathLike) -> Path:
    """Write the report with each node's inspection to <state_dir>/reports/parity-<time>.json and point
    parity-latest.json at it (atomically). Returns the report's path."""
    reports = Path(state_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = reports / f"parity-{stamp}.json"
    data = report.to_dict()
    data["inspections"] = {h: {"node": r.get("node"), "stack": r.get("stack")} for h, r in inspections.items()}
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    latest = reports / "parity-latest.json"
    tmp_link = reports / f".latest.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(path.name)
    os.replace(tmp_link, latest)
    return path
