"""The cluster as the inventory describes it: nodes, the master, ranks.

This module is the one place that knows the inventory's rules. Ansible calls it through the
``llamafleet.cluster.validate`` action (the first task of every playbook) and Python code uses
the same ``Cluster`` it returns, so rank order, addresses and process counts are decided once.

Inventory variables read per node (see ``inventory/sample`` for the commented reference):

``ansible_host``                    ssh address (defaults to the inventory name)
``llamafleet_train_addr``           training-network address; defaults to ``ansible_host``
``llamafleet_gpus``                 GPUs training uses on the node, a positive integer
``llamafleet_master``               true on exactly one node: rank 0, the rendezvous host
``llamafleet_root``                 absolute directory that holds everything llamafleet puts on the node
``llamafleet_cuda_visible_devices`` optional, e.g. "0,1,2,3": restricts the GPUs used
``llamafleet_nccl_socket_ifname``   optional NCCL_SOCKET_IFNAME (e.g. "ib0", "^docker0,lo")
``llamafleet_nccl_ib_disable``      optional bool, NCCL_IB_DISABLE
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InventoryError

NODES_GROUP = "nodes"
_IFNAME = re.compile(r"^\^?[A-Za-z0-9_.:@-]+(,\^?[A-Za-z0-9_.:@-]+)*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    ssh_addr: str
    train_addr: str
    gpus: int
    master: bool
    node_rank: int
    root: str
    cuda_visible_devices: str | None = None
    nccl_socket_ifname: str | None = None
    nccl_ib_disable: bool | None = None

    def nproc(self, cpu_only: bool) -> int:
        """Training processes on this node: one per GPU used, one on a CPU-only stack."""
        if cpu_only:
            return 1
        if self.cuda_visible_devices:
            return len(self.cuda_visible_devices.split(","))
        return self.gpus


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]

    @property
    def master(self) -> Node:
        return next(n for n in self.nodes if n.master)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def world_size(self, cpu_only: bool) -> int:
        return sum(n.nproc(cpu_only) for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [dataclasses.asdict(n) for n in self.nodes], "master": self.master.name}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Cluster":
        return cls(nodes=tuple(Node(**n) for n in data["nodes"]))


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()


def _as_bool(value: Any) -> bool | None:
    """Ansible-style booleans; None when the value is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", ""):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _check_train_addr(name: str, train_addr: str, problems: list[str]) -> None:
    """A training-network address must be a host name or an IP address."""
    if not _HOSTNAME.match(train_addr):
        try:
            ipaddress.ip_address(train_addr)
        except ValueError:
            problems.append(
                f"host {name}: llamafleet_train_addr {train_addr!r} is neither an IP address nor a "
                "host name; set it to the node's address on the training network"
            )


def _parse_gpus(name: str, hv: Mapping[str, Any], problems: list[str]) -> int:
    """``llamafleet_gpus`` as a positive integer; 0 (and a problem) when unset or invalid."""
    gpus_raw = hv.get("llamafleet_gpus")
    if gpus_raw is None:
        problems.append(
            f"host {name}: llamafleet_gpus is not set; set it to the number of GPUs training uses "
            "on this node (1 on a CPU-only node), e.g. llamafleet_gpus: 8"
        )
    elif not _is_int(gpus_raw) or int(gpus_raw) < 1:
        problems.append(
            f"host {name}: llamafleet_gpus is {gpus_raw!r}; it must be a positive integer "
            "(the number of GPUs training uses on this node), e.g. llamafleet_gpus: 8"
        )
    else:
        return int(gpus_raw)
    return 0


def _parse_master(name: str, hv: Mapping[str, Any], problems: list[str]) -> bool:
    """``llamafleet_master`` as a bool (default false; false and a problem when not a boolean)."""
    master_raw = hv.get("llamafleet_master", False)
    master = _as_bool(master_raw)
    if master is None:
        problems.append(f"host {name}: llamafleet_master is {master_raw!r}; it must be true or false")
        return False
    return master


def _parse_root(name: str, hv: Mapping[str, Any], problems: list[str]) -> str:
    """``llamafleet_root``, which must be an absolute path (a problem, and its ``str()``, otherwise)."""
    root = hv.get("llamafleet_root")
    if not root or not isinstance(root, str) or not root.startswith("/"):
        problems.append(
            f"host {name}: llamafleet_root is {root!r}; set it to an absolute directory on the node "
            "that llamafleet may own, e.g. llamafleet_root: /srv/llamafleet"
        )
        root = str(root)
    return root


def _parse_cuda_visible_devices(name: str, hv: Mapping[str, Any], gpus: int, problems: list[str]) -> str | None:
    """``llamafleet_cuda_visible_devices`` without spaces, or None when unset; its indexes must be distinct
    digits and (when ``gpus`` is known) no more than ``gpus`` of them."""
    cvd = hv.get("llamafleet_cuda_visible_devices")
    if cvd is None or cvd == "":
        return None
    cvd = str(cvd).replace(" ", "")
    ids = cvd.split(",")
    if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
        problems.append(
            f"host {name}: llamafleet_cuda_visible_devices is {cvd!r}; use distinct GPU indexes "
            "separated by commas, e.g. \"0,1,2,3\""
        )
    elif gpus and len(ids) > gpus:
        problems.append(
            f"host {name}: llamafleet_cuda_visible_devices lists {len(ids)} GPUs but "
            f"llamafleet_gpus is {gpus}; list at most llamafleet_gpus indexes"
        )
    return cvd


def _parse_nccl_socket_ifname(name: str, hv: Mapping[str, Any], problems: list[str]) -> str | None:
    """``llamafleet_nccl_socket_ifname`` as a string (None when unset), checked to be an interface list."""
    ifname = hv.get("llamafleet_nccl_socket_ifname")
    if ifname is not None and ifname != "" and not _IFNAME.match(str(ifname)):
        problems.append(
            f"host {name}: llamafleet_nccl_socket_ifname {ifname!r} is not an interface list; "
            "use names such as \"ib0\" or \"eth0,eth1\" or an exclusion such as \"^docker0,lo\""
        )
    return str(ifname) if ifname else None


def _parse_nccl_ib_disable(name: str, hv: Mapping[str, Any], problems: list[str]) -> bool | None:
    """``llamafleet_nccl_ib_disable`` as a bool, or None when unset or not a boolean (then a problem)."""
    ib_raw = hv.get("llamafleet_nccl_ib_disable")
    ib = None if ib_raw is None else _as_bool(ib_raw)
    if ib_raw is not None and ib is None:
        problems.append(f"host {name}: llamafleet_nccl_ib_disable is {ib_raw!r}; it must be true or false")
    return ib


def _parse_node(name: str, hv: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """One host's variables, checked in a fixed order, as ``Node`` fields (all but ``node_rank``)."""
    ssh_addr = str(hv.get("ansible_host") or name)
    train_addr = str(hv.get("llamafleet_train_addr") or ssh_addr)
    _check_train_addr(name, train_addr, problems)
    gpus = _parse_gpus(name, hv, problems)
    master = _parse_master(name, hv, problems)
    root = _parse_root(name, hv, problems)
    cvd = _parse_cuda_visible_devices(name, hv, gpus, problems)
    ifname = _parse_nccl_socket_ifname(name, hv, problems)
    ib = _parse_nccl_ib_disable(name, hv, problems)
    return dict(
        name=name,
        ssh_addr=ssh_addr,
        train_addr=train_addr,
        gpus=gpus,
        master=master,
        root=root,
        cuda_visible_devices=cvd,
        nccl_socket_ifname=ifname,
        nccl_ib_disable=ib,
    )


def _parse_nodes(
    hosts: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]], problems: list[str]
) -> list[dict[str, Any]]:
    """Every host once, in inventory order; a host listed twice, or two hosts that are the same node
    (same ssh address, port and ``llamafleet_root``), is a problem."""
    seen_names: set[str] = set()
    endpoints: dict[tuple[str, str, str], str] = {}
    parsed: list[dict[str, Any]] = []
    for name in hosts:
        if name in seen_names:
            problems.append(f"host {name}: listed twice in group '{NODES_GROUP}'; list each node once")
            continue
        seen_names.add(name)
        hv = hostvars.get(name, {})
        node = _parse_node(name, hv, problems)
        ssh_addr, root = node["ssh_addr"], node["root"]
        port = str(hv.get("ansible_port") or 22)
        key = (ssh_addr, port, str(root))
        if key in endpoints:
            problems.append(
                f"host {name}: same node as {endpoints[key]} (ssh {ssh_addr}:{port}, llamafleet_root "
                f"{root}); each node must be listed once; remove one of them"
            )
        else:
            endpoints[key] = name
        parsed.append(node)
    return parsed


def _check_one_master(parsed: Sequence[Mapping[str, Any]], problems: list[str]) -> None:
    """Exactly one node must be the master."""
    masters = [p["name"] for p in parsed if p["master"]]
    if not masters:
        problems.append(
            "no master node: set llamafleet_master: true on exactly one host of group "
            f"'{NODES_GROUP}' (it becomes node rank 0 and hosts the rendezvous)"
        )
    elif len(masters) > 1:
        problems.append(
            f"{len(masters)} master nodes ({', '.join(masters)}): set llamafleet_master: true on exactly "
            "one host and remove it from the others"
        )


def validate(hosts: Sequence[str], hostvars: Mapping[str, Mapping[str, Any]]) -> Cluster:
    """Check the inventory's nodes and return the cluster, with node ranks assigned.

    ``hosts`` is the ``nodes`` group in inventory order; ``hostvars`` maps each to its variables.
    Every problem found is reported at once, each naming the host, the variable and the fix.
    """
    problems: list[str] = []
    if not hosts:
        raise InventoryError(
            f"the inventory has no hosts in group '{NODES_GROUP}': list your training servers under "
            f"all.children.{NODES_GROUP}.hosts (see inventory/sample/hosts.yml)"
        )
    parsed = _parse_nodes(hosts, hostvars, problems)
    _check_one_master(parsed, problems)
    if problems:
        raise InventoryError(problems)
    # Rank order: the master is 0, the others follow in inventory order. Stable across runs.
    ordered = [p for p in parsed if p["master"]] + [p for p in parsed if not p["master"]]
    return Cluster(nodes=tuple(Node(node_rank=i, **p) for i, p in enumerate(ordered)))
