"""The namespace testbed: real SSH with checked host keys, own hostnames, node-to-node traffic."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from testbed import Testbed  # tests/ is on sys.path (conftest.py)

SLOT = 9
ANSIBLE = pathlib.Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ansible"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/usr/sbin/sshd"):
        return "needs /usr/sbin/sshd (apt-get install openssh-server)"
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    with Testbed(tmp_path_factory.mktemp("testbed"), nodes=3, slot=SLOT) as testbed:
        yield testbed


def test_each_node_has_own_hostname_and_ip(tb):
    for node in tb.nodes:
        out = tb.ssh(node, "hostname; ip -4 -o addr show dev eth0").stdout.splitlines()
        assert out[0] == node.name
        assert f"inet {node.ip}/24" in out[1]
        assert node.root.is_dir()


def test_each_node_has_its_own_process_table(tb):
    """As on real hosts, a node sees only its own processes: a process started on node1 is not on node2."""
    tb.ssh("node1", "setsid sleep 300 >/dev/null 2>&1 < /dev/null & echo started")
    try:
        seen = {n.name: tb.ssh(n, "ps -eo comm,args | grep -c '^sleep *sleep 300$' || true").stdout.strip() for n in tb.nodes}
        assert seen["node1"] == "1" and seen["node2"] == "0", seen
        # its PID 1 is the node's own init (which runs its sshd), not this machine's
        init = tb.ssh("node2", "tr '\\0' ' ' < /proc/1/cmdline").stdout
        assert "/usr/sbin/sshd -D" in init, init
    finally:
        tb.ssh("node1", "pkill -f '^sleep 300$' || true")


def test_node_reaches_listener_on_another_node(tb):
    master, worker = tb.nodes[0], tb.nodes[1]
    listener = (
        "import socket\n"
        f"s = socket.create_server(('{master.ip}', 29500)); s.settimeout(30)\n"
        "c, _ = s.accept(); c.sendall(b'hello from ' + socket.gethostname().encode()); c.close()\n"
    )
    # detached so that the ssh call returns; down() kills it if the test fails
    tb.ssh(master, f"setsid nohup python3 -c \"{listener}\" >/dev/null 2>&1 </dev/null &")
    client = (
        "import socket, time\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        print(socket.create_connection(('{master.ip}', 29500), timeout=5).recv(64).decode()); break\n"
        "    except ConnectionRefusedError:\n"
        "        time.sleep(0.1)\n"
    )
    assert tb.ssh(worker, f"python3 -c \"{client}\"").stdout.strip() == "hello from node1"


def test_wrong_host_key_is_rejected(tb, tmp_path):
    # node1's address paired with node2's key: ssh to node1 must refuse the real key
    lines = tb.known_hosts.read_text().splitlines()
    node2_key = lines[1].split(maxsplit=1)[1]
    tampered = tmp_path / "known_hosts"
    tampered.write_text(f"{tb.nodes[0].ip} {node2_key}\n" + "\n".join(lines[1:]) + "\n")
    args = [f"UserKnownHostsFile={tampered}" if a.startswith("UserKnownHostsFile=") else a for a in tb.ssh_args()]

    bad = subprocess.run(["ssh", *args, tb.nodes[0].ip, "true"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 255
    assert "Host key verification failed" in bad.stderr
    good = subprocess.run(["ssh", *args, tb.nodes[1].ip, "true"], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0, good.stderr


def test_inventory_shape(tb, tmp_path):
    doc = yaml.safe_load(tb.inventory_path.read_text())
    assert set(doc["all"]) == {"children"}  # nothing on `all`, connection vars on `nodes`
    group = doc["all"]["children"]["nodes"]
    assert group["vars"]["ansible_ssh_private_key_file"] == str(tb.client_key)
    assert f"UserKnownHostsFile={tb.known_hosts}" in group["vars"]["ansible_ssh_common_args"]
    assert group["hosts"]["node1"] == {
        "ansible_host": f"10.231.{SLOT}.11", "llamafleet_root": str(tb.nodes[0].root), "llamafleet_master": True,
    }
    assert "llamafleet_master" not in group["hosts"]["node3"]

    variant = tb.write_inventory(
        tmp_path / "variant.yml", extra_host_vars={"node3": {"llamafleet_gpus": 2}},
        extra_group_vars={"llamafleet_gpus": 4}, nodes=["node2", "node3"],
    )
    group = yaml.safe_load(variant.read_text())["all"]["children"]["nodes"]
    assert list(group["hosts"]) == ["node2", "node3"]
    assert group["hosts"]["node2"]["llamafleet_master"] is True
    assert group["hosts"]["node3"]["llamafleet_gpus"] == 2
    assert group["vars"]["llamafleet_gpus"] == 4
    with pytest.raises(ValueError):
        tb.write_inventory(tmp_path / "bad.yml", extra_host_vars={"node9": {}})


def test_ansible_ping_with_host_key_checking(tb):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["ANSIBLE_HOST_KEY_CHECKING"] = "True"
    proc = subprocess.run(
        [str(ANSIBLE), "-i", str(tb.inventory_path), "nodes", "-m", "ansible.builtin.ping"],
        cwd="/tmp", env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(re.findall(r"^(node\d+) \| SUCCESS", proc.stdout, re.M)) == ["node1", "node2", "node3"]


def test_up_clears_leftovers_and_down_clears_everything(tb, tmp_path):
    # Runs last: a second testbed on the same slot stands for a rerun after a killed run. Its
    # up() must remove the first one's namespaces and sshds, including node3 which it lacks.
    sshds = {n.pid_file: int(n.pid_file.read_text()) for n in tb.nodes}
    second = Testbed(tmp_path, nodes=2, slot=SLOT).up()
    try:
        assert second.ssh("node2", "hostname").stdout.strip() == "node2"
        assert all(_gone(pid) for pid in sshds.values())
        sshds.update({n.pid_file: int(n.pid_file.read_text()) for n in second.nodes})
    finally:
        second.down()

    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not re.search(rf"^lf{SLOT}n\d+", namespaces, re.M)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert f"lfbr{SLOT}" not in links and not re.search(rf"lf{SLOT}n\d+h", links)
    for pid_file, pid in sshds.items():
        assert _gone(pid), f"sshd {pid} of {pid_file} still runs"
    tb.down()  # the fixture's teardown calls it again: must stay harmless


def _gone(pid: int) -> bool:
    """No such process, or a zombie (PID 1 here may never reap daemonized sshds)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
