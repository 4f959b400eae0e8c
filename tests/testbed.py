"""A multi-node testbed on one machine: network namespaces, each running its own sshd.

Every node is a network namespace on a Linux bridge with its own address, hostname (UTS
namespace), process table (PID namespace, with an init that reaps orphans, as a real host has),
sshd, ed25519 host key and root directory. The controller (the root namespace)
reaches the nodes over real SSH through the bridge, with host keys checked against a
generated known_hosts, and nodes reach each other (torch.distributed rendezvous needs it).
Namespaces share the filesystem, users and /etc/hosts: use IPs and each node's root directory.

``slot`` (0..9) keeps several testbeds apart: subnet 10.231.<slot>.0/24, bridge ``lfbr<slot>``
at .1, node i at .<10+i> in namespace ``lf<slot>n<i>`` with host-side veth ``lf<slot>n<i>h``.
Only devices and namespaces with these names are ever touched. Needs root, iproute2, openssh.

Module use::

    with Testbed(tmp_path, nodes=3, slot=9) as tb:
        tb.ssh("node2", "hostname")

CLI (state kept in DIR/testbed.json)::

    python tests/testbed.py up --nodes 8 --workdir DIR [--slot S]   # prints the inventory path
    python tests/testbed.py down --workdir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import yaml

SSHD = "/usr/sbin/sshd"
STATE_FILE = "testbed.json"
READY_TIMEOUT_S = 20.0
# PID 1 of a node's PID namespace: runs sshd in the foreground, reaps every orphan the node's processes leave
# (as init does on a real host), passes TERM on, and ends with sshd (which ends the namespace).
INIT = """
import os, signal, sys
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda s, f: os.kill(child, signal.SIGTERM))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(0)
    except InterruptedError:
        continue
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""
KILL_GRACE_S = 2.0
POLL_S = 0.02


@dataclasses.dataclass(frozen=True)
class TestNode:
    __test__ = False  # not a pytest test class despite the name

    name: str
    ip: str
    netns: str
    root: pathlib.Path
    pid_file: pathlib.Path
    local_source: pathlib.Path  # what this node alone sees at Testbed.local_dir (its own disk, as on a real host)


class SSHError(subprocess.CalledProcessError):
    """A failed ``Testbed.ssh`` call; its message carries the remote stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}\n{stdin or ''}")
    return proc


def _alive(pid: int) -> bool:
    # Daemonized sshds are reparented to PID 1, which may never reap them: a zombie counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for p in pids if _alive(p)}
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(POLL_S)


def _keygen(path: pathlib.Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True, capture_output=True,
        )


class Testbed:
    __test__ = False  # not a pytest test class despite the name

    def __init__(self, workdir: pathlib.Path, nodes: int, slot: int = 0):
        if not 0 <= slot <= 9:
            raise ValueError(f"slot must be 0..9, not {slot}")
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be 1..200, not {nodes}")
        self.workdir = pathlib.Path(workdir).resolve()
        self.slot = slot
        self.subnet = f"10.231.{slot}"
        self.bridge = f"lfbr{slot}"
        self.client_key = self.workdir / "ssh" / "id_ed25519"
        self.known_hosts = self.workdir / "ssh" / "known_hosts"
        self.inventory_path = self.workdir / "inventory" / "hosts.yml"
        # One path, a different directory on every node (a private bind mount of its local_source): a
        # node-local disk, where the shared filesystem of the namespaces would otherwise be one for all.
        self.local_dir = self.workdir / "local"
        self.nodes = [
            TestNode(
                name=f"node{i}",
                ip=f"{self.subnet}.{10 + i}",
                netns=f"lf{slot}n{i}",
                root=self.workdir / "nodes" / f"node{i}",
                pid_file=self.workdir / "sshd" / f"node{i}.pid",
                local_source=self.workdir / "nodes" / f"node{i}" / "local",
            )
            for i in range(1, nodes + 1)
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Testbed:
        """Start the testbed; first removes whatever an earlier run of this slot left."""
        self.down()
        try:
            self._write_keys_and_configs()
            self._create_network()
            self._start_sshds()
            self._wait_ready()
            self.write_inventory(self.inventory_path)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process of this slot's nodes and delete its network. Files are kept."""
        prefix = f"lf{self.slot}n"
        namespaces = re.findall(rf"^({prefix}\d+)\b", _ip("netns", "list", check=False).stdout, re.M)
        pids: set[int] = set()
        for ns in namespaces:
            pids.update(int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split())
        pids.update(self._pid_file_pids())
        # sshd children and anything started over ssh also die, which closes client-side
        # ControlMaster connections instead of leaving them hanging on a dead namespace.
        _signal_all(pids, signal.SIGTERM)
        left = _wait_gone(pids, KILL_GRACE_S)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, KILL_GRACE_S)

        veths = re.findall(rf"^\d+: ({prefix}\d+h)[@:]", _ip("-o", "link", "show", check=False).stdout, re.M)
        commands = [f"link del {v}" for v in veths] + [f"netns del {ns}" for ns in namespaces]
        commands.append(f"link del {self.bridge}")
        # -force: go on past devices that are already gone
        _ip("-force", "-batch", "-", stdin="\n".join(commands) + "\n", check=False)

    # -- ssh -------------------------------------------------------------------------------

    def ssh_args(self) -> list[str]:
        return [
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "User=root",
            "-o", "ConnectTimeout=10",
        ]

    def ssh(self, node: str | TestNode, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        ip = self._node(node).ip
        argv = ["ssh", *self.ssh_args(), ip, command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SSHError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    # -- faults ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def shaped(self, node: str | TestNode, rate: str):
        """Traffic into ``node`` held to ``rate`` (e.g. "80mbit": tc tbf on its host-side veth) inside the block."""
        veth = self._node(node).netns + "h"
        subprocess.run(["tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", rate, "burst", "64kb", "latency",
                        "400ms"], check=True)
        try:
            yield
        finally:
            subprocess.run(["tc", "qdisc", "del", "dev", veth, "root"], check=False)

    def kill_relay_when_receiving(self, node: str | TestNode, root: pathlib.Path, stop: threading.Event,
                                  min_bytes: int = 1) -> None:
        """SIGKILL ``node``'s fan-out relay (under its llamafleet ``root``) once it has received ``min_bytes``, or
        give up when ``stop`` is set; for a thread beside a transfer."""
        while not stop.is_set():
            for status in (root / "fanout").glob("*/status.json"):
                try:
                    st = json.loads(status.read_text())
                except ValueError:
                    continue
                if st.get("state") == "receiving" and st.get("bytes", 0) >= min_bytes:
                    self.ssh(node, f"kill -9 {int(st['pid'])}", check=False)
                    return
            time.sleep(0.02)

    # -- inventory -------------------------------------------------------------------------

    def write_inventory(
        self,
        path: pathlib.Path,
        extra_host_vars: dict[str, dict] | None = None,
        extra_group_vars: dict | None = None,
        nodes: list[str] | None = None,
    ) -> pathlib.Path:
        """Write an inventory of ``nodes`` (default all; the first one is the master).

        Connection variables sit on the ``nodes`` group, not ``all``, so that tasks delegated to
        localhost do not inherit them. Extra vars are merged over the defaults.
        """
        selected = [self._node(n) for n in nodes] if nodes is not None else self.nodes
        extra_host_vars = extra_host_vars or {}
        unknown = set(extra_host_vars) - {n.name for n in selected}
        if unknown:
            raise ValueError(f"extra_host_vars for hosts not in the inventory: {sorted(unknown)}")
        group_vars = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
                " -o GlobalKnownHostsFile=/dev/null"
            ),
            "ansible_python_interpreter": "/usr/bin/python3",
            "llamafleet_gpus": 1,
            **(extra_group_vars or {}),
        }
        hosts = {}
        for i, n in enumerate(selected):
            host = {"ansible_host": n.ip, "llamafleet_root": str(n.root)}
            if i == 0:
                host["llamafleet_master"] = True
            hosts[n.name] = {**host, **extra_host_vars.get(n.name, {})}
        doc = {"all": {"children": {"nodes": {"vars": group_vars, "hosts": hosts}}}}
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
        return path

    # -- internals -------------------------------------------------------------------------

    def _node(self, node: str | TestNode) -> TestNode:
        name = node.name if isinstance(node, TestNode) else node
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in this testbed")

    def _sshd_config(self, node: TestNode) -> pathlib.Path:
        return self.workdir / "sshd" / f"{node.name}.conf"

    def _sshd_log(self, node: TestNode) -> pathlib.Path:
        return self.workdir / "sshd" / f"{node.name}.log"

    def _sshd_log_tail(self, node: TestNode) -> str:
        try:
            return " | ".join(self._sshd_log(node).read_text().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def _pid_file_pids(self) -> set[int]:
        """sshd pids from this workdir's pid files, only if the process still is that sshd."""
        pids = set()
        for node in self.nodes:
            try:
                pid = int(node.pid_file.read_text().split()[0])
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if str(self._sshd_config(node)).encode() in cmdline:
                pids.add(pid)
        return pids

    def _write_keys_and_configs(self) -> None:
        sshd_dir = self.workdir / "sshd"
        for d in (self.client_key.parent, sshd_dir, self.inventory_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        _keygen(self.client_key, "llamafleet-testbed")
        authorized_keys = sshd_dir / "authorized_keys"
        authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        known_hosts = []
        for node in self.nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            host_key = sshd_dir / f"{node.name}_host_ed25519_key"
            _keygen(host_key, node.name)
            keytype, key = host_key.with_suffix(".pub").read_text().split()[:2]
            known_hosts.append(f"{node.ip} {keytype} {key}\n")
            node.pid_file.unlink(missing_ok=True)
            self._sshd_config(node).write_text(
                f"ListenAddress {node.ip}:22\n"
                f"HostKey {host_key}\n"
                "PidFile none\n"  # in its own PID namespace, its pid means nothing here: the testbed writes it
                f"AuthorizedKeysFile {authorized_keys}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"  # keys live in the workdir, possibly under a world-writable /tmp
                "MaxStartups 100\n"
                "MaxSessions 100\n"
                "PrintMotd no\n"
                "Subsystem sftp internal-sftp\n"
            )
        self.known_hosts.write_text("".join(known_hosts))

    def _create_network(self) -> None:
        commands = [
            f"link add {self.bridge} type bridge",
            f"addr add {self.subnet}.1/24 dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for node in self.nodes:
            commands += [
                f"netns add {node.netns}",
                f"link add {node.netns}h master {self.bridge} up type veth peer name eth0 netns {node.netns}",
            ]
        _ip("-batch", "-", stdin="\n".join(commands) + "\n")
        for node in self.nodes:
            _ip("-n", node.netns, "-batch", "-", stdin=(
                "link set lo up\n"
                f"addr add {node.ip}/24 dev eth0\n"
                "link set eth0 up\n"
            ))

    def _start_sshds(self) -> None:
        """Start one sshd per node in its namespace and its own UTS namespace (hostname), and its own
        mount namespace, where ``local_dir`` is the node's ``local_source`` (what it alone sees there).

        sshd daemonizes itself (the launcher exits once the config is read), in a new session so
        that it outlives the caller; a bad config shows as the launcher's exit status. sshd
        writes its errors, those of the config included, to its -E log, not to stderr.
        """
        launchers = {}
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.local_source.mkdir(parents=True, exist_ok=True)
            argv = [
                "ip", "netns", "exec", node.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "--pid", "--fork", "--mount-proc", "sh", "-c",
                f'hostname "$1" && mount --bind "$4" "$5" && exec "$6" -c "$7" {SSHD} -D -f "$2" -E "$3"', "sh",
                node.name, str(self._sshd_config(node)), str(self._sshd_log(node)),
                str(node.local_source), str(self.local_dir), sys.executable, INIT,
            ]
            launchers[node] = subprocess.Popen(
                argv, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            node.pid_file.write_text(f"{launchers[node].pid}\n")
        time.sleep(0.3)
        for node, proc in launchers.items():
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise RuntimeError(
                    f"sshd of {node.name} failed to start (rc={proc.returncode}): "
                    f"{err.strip()} {self._sshd_log_tail(node)}"
                )
            proc.stderr.close()

    def _wait_ready(self) -> None:
        """Poll every node with a real `ssh true` until all accept connections."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(self.nodes)
        errors: dict[str, str] = {}
        while pending:
            probes = {
                node: subprocess.Popen(
                    ["ssh", *self.ssh_args(), node.ip, "true"], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
                for node in pending
            }
            for node, proc in probes.items():
                _, err = proc.communicate()
                if proc.returncode == 0:
                    pending.remove(node)
                else:
                    errors[node.name] = err.strip()
            if pending and time.monotonic() >= deadline:
                detail = "; ".join(
                    f"{n.name} ({n.ip}): {errors[n.name]} [sshd log: {self._sshd_log_tail(n)}]" for n in pending
                )
                raise TimeoutError(f"sshd not reachable after {READY_TIMEOUT_S:.0f} s on {detail}")
            if pending:
                time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Network-namespace testbed with one sshd per node.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the testbed and print the inventory path")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--workdir", type=pathlib.Path, required=True)
    up.add_argument("--slot", type=int, default=0)
    down = sub.add_parser("down", help="stop the testbed recorded in WORKDIR")
    down.add_argument("--workdir", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    state_file = args.workdir / STATE_FILE
    if args.command == "up":
        start = time.monotonic()
        tb = Testbed(args.workdir, args.nodes, args.slot).up()
        state_file.write_text(json.dumps({"nodes": args.nodes, "slot": args.slot}) + "\n")
        print(f"testbed: {args.nodes} nodes up in {time.monotonic() - start:.2f} s", file=sys.stderr)
        print(tb.inventory_path)
    else:
        state = json.loads(state_file.read_text())
        Testbed(args.workdir, state["nodes"], state["slot"]).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
