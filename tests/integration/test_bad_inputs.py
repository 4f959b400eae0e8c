"""Bad input: one clear message naming the host, file or key, a non-zero exit, no traceback,
and nothing installed on any node. Driven through the CLI, as a user meets them."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from conftest import LIGHT_LOCK

pytestmark = pytest.mark.integration


def _inventory(testbed, tmp_path, host_vars=None, group_vars=None, nodes=None, extra_nodes=None):
    names = nodes or [n.name for n in testbed.nodes]
    hv = {n: {"llamafleet_root": str(tmp_path / "roots" / n)} for n in names}
    for n, v in (host_vars or {}).items():
        hv.setdefault(n, {}).update(v)
    path = testbed.write_inventory(tmp_path / "inv" / "hosts.yml", extra_host_vars=hv,
                                   extra_group_vars={"llamafleet_lock_file": str(LIGHT_LOCK), "stack_offline": True,
                                                     **(group_vars or {})},
                                   nodes=names)
    if extra_nodes:
        data = yaml.safe_load(path.read_text())
        data["all"]["children"]["nodes"]["hosts"].update(extra_nodes)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _case_missing_master(tb, tmp):
    return ["-i", str(_inventory(tb, tmp, host_vars={"node1": {"llamafleet_master": False}}))], "no master node"


def _case_two_masters(tb, tmp):
    return ["-i", str(_inventory(tb, tmp, host_vars={"node3": {"llamafleet_master": True}}))], "2 master nodes (node1, node3)"


def _case_gpus_eight(tb, tmp):
    return ["-i", str(_inventory(tb, tmp, host_vars={"node2": {"llamafleet_gpus": "eight"}}))], \
        "host node2: llamafleet_gpus is 'eight'; it must be a positive integer"


def _case_relative_root(tb, tmp):
    return ["-i", str(_inventory(tb, tmp, host_vars={"node2": {"llamafleet_root": "srv/lf"}}))], \
        "host node2: llamafleet_root is 'srv/lf'; set it to an absolute directory"


def _case_unknown_flavor(tb, tmp):
    return ["-i", str(_inventory(tb, tmp)), "--flavor", "rocm"], "llamafleet_flavor is 'rocm', which"


def _case_malformed_yaml(tb, tmp):
    path = _inventory(tb, tmp)
    path.write_text(path.read_text().replace("hosts:", "hosts: [unclosed", 1))
    return ["-i", str(path)], str(path)


def _case_duplicate_host(tb, tmp):
    path = _inventory(tb, tmp)
    text = path.read_text()
    block = re.search(r"^(\s+)node2:\n(?:\1\s+.*\n)+", text, re.M).group(0)
    path.write_text(text.replace(block, block + block, 1))
    return ["-i", str(path)], "node2"


def _case_same_node_twice(tb, tmp):
    node1 = tb.nodes[0]
    extra = {"node1b": {"ansible_host": node1.ip, "llamafleet_root": str(tmp / "roots" / "node1")}}
    return ["-i", str(_inventory(tb, tmp, extra_nodes=extra))], "host node1b: same node as node1"


def _case_unreachable_node(tb, tmp):
    dead = tb.nodes[0].ip.rsplit(".", 1)[0] + ".99"  # on the testbed's bridge, nobody there
    extra = {"node9": {"ansible_host": dead, "llamafleet_root": str(tmp / "roots" / "node9")}}
    return ["-i", str(_inventory(tb, tmp, extra_nodes=extra, group_vars={"ansible_ssh_timeout": 3}))], "node9: unreachable"


def _case_host_key_mismatch(tb, tmp):
    lines = tb.known_hosts.read_text().splitlines()
    ip1, ip2 = tb.nodes[0].ip, tb.nodes[1].ip
    key1 = next(line for line in lines if line.startswith(ip1 + " ")).split(" ", 1)[1]
    forged = [f"{ip2} {key1}" if line.startswith(ip2 + " ") else line for line in lines]
    kh = tmp / "forged_known_hosts"
    kh.write_text("\n".join(forged) + "\n")
    args = f"-o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null"
    # a fresh ControlPath directory: a live master connection from earlier tests would skip the key exchange
    return ["-i", str(_inventory(tb, tmp, group_vars={"ansible_ssh_common_args": args})),
            "-e", f"ansible_ssh_control_path_dir={tmp / 'cp'}"], "Host key verification failed"


def _case_pin_not_on_index(tb, tmp):
    bad = tmp / "bad-lock.yml"
    bad.write_text(LIGHT_LOCK.read_text().replace('six: "1.16.0"', 'six: "99.0.0"'))
    return ["-i", str(_inventory(tb, tmp)), "--lock", str(bad)], "six==99.0.0"


def _case_missing_lock(tb, tmp):
    return ["-i", str(_inventory(tb, tmp)), "--lock", str(tmp / "nope.yml")], "nope.yml does not exist"


def _case_wrong_python(tb, tmp):
    return ["-i", str(_inventory(tb, tmp)), "-e", "llamafleet_python=pypy3"], "asks for 3.11"


def _case_missing_inventory(tb, tmp):
    return ["-i", str(tmp / "no-such-inventory")], "no-such-inventory does not exist"


def _case_no_nodes_group(tb, tmp):
    path = _inventory(tb, tmp)
    path.write_text(path.read_text().replace("    nodes:", "    servers:", 1))
    return ["-i", str(path)], "no hosts in group 'nodes'"


CASES = {name[len("_case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_clearly_and_changes_nothing(case, testbed, tmp_path, cli):
    args, fragment = CASES[case](testbed, tmp_path)
    proc = cli("provision", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert fragment in out, out
    roots = tmp_path / "roots"
    installed = sorted(str(p) for p in roots.glob("*/stacks/*")) if roots.exists() else []
    assert not installed, f"something was installed: {installed}"
    if roots.exists():
        shutil.rmtree(roots)


def test_there_are_at_least_ten_cases():
    assert len(CASES) >= 10
