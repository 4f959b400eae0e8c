import pytest

from llamafleet.errors import InventoryError
from llamafleet.inventory import validate


def node(**kw):
    base = {"ansible_host": "10.0.0.1", "llamafleet_gpus": 8, "llamafleet_root": "/srv/lf"}
    base.update(kw)
    return base


def test_master_is_rank_zero_and_order_is_the_inventory_order():
    hv = {"a": node(ansible_host="10.0.0.1"), "b": node(ansible_host="10.0.0.2", llamafleet_master=True),
          "c": node(ansible_host="10.0.0.3")}
    cluster = validate(["a", "b", "c"], hv)
    assert [(n.name, n.node_rank) for n in cluster.nodes] == [("b", 0), ("a", 1), ("c", 2)]
    assert cluster.master.name == "b"


def test_train_addr_defaults_to_ssh_address_and_can_differ():
    hv = {"a": node(llamafleet_master=True, llamafleet_train_addr="192.168.10.1"), "b": node(ansible_host="10.0.0.2")}
    cluster = validate(["a", "b"], hv)
    assert cluster.node("a").train_addr == "192.168.10.1"
    assert cluster.node("b").train_addr == "10.0.0.2"


def test_world_size_counts_processes_per_node():
    hv = {"a": node(llamafleet_master=True, llamafleet_gpus=8),
          "b": node(ansible_host="10.0.0.2", llamafleet_gpus=4, llamafleet_cuda_visible_devices="0,1")}
    cluster = validate(["a", "b"], hv)
    assert cluster.world_size(cpu_only=False) == 10
    assert cluster.world_size(cpu_only=True) == 2


@pytest.mark.parametrize("hv, fragment", [
    ({"a": node(), "b": node(ansible_host="10.0.0.2")}, "no master node"),
    ({"a": node(llamafleet_master=True), "b": node(ansible_host="10.0.0.2", llamafleet_master=True)}, "2 master nodes (a, b)"),
    ({"a": node(llamafleet_master=True, llamafleet_gpus="eight")}, "host a: llamafleet_gpus is 'eight'"),
    ({"a": node(llamafleet_master=True, llamafleet_gpus=0)}, "host a: llamafleet_gpus is 0"),
    ({"a": node(llamafleet_master=True, llamafleet_gpus=None)}, "host a: llamafleet_gpus is not set"),
    ({"a": node(llamafleet_master=True, llamafleet_root="srv/lf")}, "host a: llamafleet_root is 'srv/lf'"),
    ({"a": node(llamafleet_master="maybe")}, "host a: llamafleet_master is 'maybe'"),
    ({"a": node(llamafleet_master=True), "b": node()}, "host b: same node as a"),
    ({"a": node(llamafleet_master=True, llamafleet_nccl_socket_ifname="eth0; rm -rf /")}, "llamafleet_nccl_socket_ifname"),
    ({"a": node(llamafleet_master=True, llamafleet_cuda_visible_devices="0,0")}, "llamafleet_cuda_visible_devices"),
    ({"a": node(llamafleet_master=True, llamafleet_gpus=2, llamafleet_cuda_visible_devices="0,1,2")}, "lists 3 GPUs"),
    ({"a": node(llamafleet_master=True, llamafleet_train_addr="not an address")}, "llamafleet_train_addr"),
])
def test_bad_inventories_name_the_host_and_the_fix(hv, fragment):
    with pytest.raises(InventoryError) as err:
        validate(list(hv), hv)
    assert fragment in str(err.value)


def test_all_problems_are_reported_at_once():
    hv = {"a": node(llamafleet_gpus="eight"), "b": node(ansible_host="10.0.0.2", llamafleet_root="rel")}
    with pytest.raises(InventoryError) as err:
        validate(["a", "b"], hv)
    assert len(err.value.problems) == 3  # gpus, root, no master


def test_empty_group():
    with pytest.raises(InventoryError, match="no hosts in group 'nodes'"):
        validate([], {})
