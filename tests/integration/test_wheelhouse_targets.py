"""The offline wheelhouse holds the files the nodes install, never the controller's: built here (Linux
x86_64, Python 3.11) for aarch64 nodes of a Python 3.12 lock, from the real package index with the real pip."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import PROJECT

from llamafleet import lock

sys.path.insert(0, str(PROJECT / "collections"))

from ansible_collections.llamafleet.cluster.plugins.action import wheelhouse  # noqa: E402

pytestmark = [pytest.mark.integration]

GH200 = {"glibc": "2.17", "hosts": ["gh1", "gh2"]}  # what an aarch64 node's inspection reports


def stack_of(tmp_path, packages, build_with_torch=()):
    path = tmp_path / "lock.yml"
    path.write_text(yaml.safe_dump({
        "schema": 1, "python": "3.12", "components": sorted(packages), "smoke_imports": [],
        "build_with_torch": list(build_with_torch), "packages": packages,
        "flavors": {"cpu": {"description": "t", "cuda": None, "torch_mode": "pip", "packages": {},
                            "pip": {"index_url": None, "extra_index_urls": [], "find_links": []}}}}))
    return lock.load_stack(path, "cpu")


def test_wheels_are_the_nodes_platform_and_python_and_wheel_less_pins_travel_as_sdists(tmp_path):
    # fire 0.7.0 published no wheel at all: its sdist is carried (and built on the node)
    stack = stack_of(tmp_path, {"six": "1.16.0", "markupsafe": "3.0.2", "fire": "0.7.0"})
    dest = tmp_path / "wh"
    assert wheelhouse._download(stack, dest, stack.pip.args(), "aarch64", GH200) is None
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["MarkupSafe-3.0.2-cp312-cp312-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
                     "fire-0.7.0.tar.gz", "six-1.16.0-py2.py3-none-any.whl"], files


def test_a_pin_without_a_wheel_for_the_nodes_is_named_with_the_platform_and_hosts(tmp_path):
    # numpy 2.3.0's aarch64 wheels need glibc 2.28; it has an sdist, which an offline node could not build
    stack = stack_of(tmp_path, {"numpy": "2.3.0"})
    msg = wheelhouse._download(stack, tmp_path / "wh", stack.pip.args(), "aarch64", GH200)
    assert msg and "numpy==2.3.0 has no wheel for CPython 3.12 on Linux aarch64 (glibc 2.17: gh1, gh2)" in msg, msg
    assert "nothing was installed" in msg
