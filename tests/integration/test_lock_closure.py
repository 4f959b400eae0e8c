"""The CUDA flavors' closures, as a node would install them, checked against the real package index without a
GPU: every pin of the cu128 flavor has a wheel for Linux x86_64 and the lock's Python, pip resolves the whole
closure (``pip install --dry-run --no-deps``, metadata only), and the sdists built against torch exist."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamafleet import lock, pins

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("flavor", ["cu128"])
def test_every_pin_of_the_cuda_flavor_resolves_for_linux_x86_64(flavor, tmp_path):
    stack = lock.load_stack(None, flavor)
    report = tmp_path / "report.json"
    argv = pins.dry_run_argv(stack, sys.executable, report, tmp_path / "target")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): (i["metadata"]["version"], i["download_info"]["url"])
                for i in json.loads(report.read_text())["install"]}
    wheels = {n: v for n, v in stack.packages.items() if n not in stack.build_with_torch}
    assert set(resolved) == set(wheels), set(wheels) ^ set(resolved)
    for name, pin in wheels.items():
        version, url = resolved[name]
        assert version == pin and url.endswith(".whl"), (name, pin, version, url)
    torch_url = resolved["torch"][1]
    assert "cp311" in torch_url and "x86_64" in torch_url
    assert pins.sdist_problems(stack) == []


# vLLM's wheel is manylinux_2_31 (glibc >= 2.31 on the nodes that serve, as its description says)
SERVING_PLATFORMS = pins.linux_platforms("x86_64", "2.31")


@pytest.mark.parametrize("name,flavor", [("vllm", "cu128")])
def test_every_pin_of_the_serving_stack_resolves_for_linux_x86_64(name, flavor, tmp_path):
    stack = lock.load_serving(None, name, flavor)
    report = tmp_path / "report.json"
    argv = pins.dry_run_argv(stack, sys.executable, report, tmp_path / "target", platforms=SERVING_PLATFORMS)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): (i["metadata"]["version"],
                                                                                   i["download_info"]["url"])
                for i in json.loads(report.read_text())["install"]}
    assert set(resolved) == set(stack.packages), set(stack.packages) ^ set(resolved)
    for pkg, pin in stack.packages.items():
        version, url = resolved[pkg]
        assert version == pin and url.endswith(".whl"), (pkg, pin, version, url)
    assert stack.packages["torch"] == "2.10.0" and "cp311" in resolved["torch"][1]
    # vLLM's own requirements are inside the closure at the pinned versions (pip check, from the wheels' metadata)
    vllm_meta = next(i["metadata"] for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "vllm")
    assert any(r.replace(" ", "").startswith("torch==2.10.0") for r in vllm_meta.get("requires_dist", [])), vllm_meta
