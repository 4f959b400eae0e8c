"""What each node runs: its rank-specific environment, its launch command, the DeepSpeed hostfile.

The environment file and the hostfile are rendered from ``templates/`` with the same Jinja
features Ansible's ``template`` module has (``quote`` is Ansible's filter of that name), so a
playbook can render them too, from the variables this module computes:

``node.env.j2``  ``node_env``: mapping of variable name to value (``node_env()``)
``hostfile.j2``  ``hostfile_entries``: list of ``{host, slots}`` in node-rank order (``hostfile_entries()``)

LLaMA-Factory's ``llamafactory-cli train`` reads the rendezvous from the environment (see
``node_env``) and starts ``torchrun`` itself, splitting its command line on whitespace: no path
it gets (yaml, venv) may contain whitespace.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from .errors import ConfigError
from .inventory import Cluster, Node
from .paths import PROJECT_DIR

TEMPLATES_DIR = PROJECT_DIR / "templates"
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
# Keys of an accelerate config that say where each process runs: llamafleet sets them per node from the
# inventory, whatever the user's own file (e.g. an FSDP config) says; every other key of it is kept.
ACCELERATE_OWNED = ("compute_environment", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                    "num_processes", "use_cpu", "rdzv_backend", "same_network")
# accelerate only starts these across machines on GPUs (on CPU the same launch is MULTI_CPU DDP over gloo)
_ACCELERATE_GPU_ONLY = ("FSDP", "DEEPSPEED", "MULTI_GPU", "MEGATRON_LM")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Set by node_env from the cluster; `extra` must not change them, or nodes disagree on the rendezvous.
# RANK is LLaMA-Factory's classic trap: it reads NODE_RANK, and torchrun sets RANK per process.
RENDEZVOUS_KEYS = ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RANK")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A DeepSpeed hostfile/--include host label: no whitespace, and ':' and '@' separate slots and hosts.
_DS_LABEL = re.compile(r"^[^\s:@#]+$")


@functools.cache
def _jinja(templates_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,  # as Ansible's template module
        autoescape=False,
    )
    env.filters["quote"] = shlex.quote
    return env


def render(template: str, templates_dir: Path = TEMPLATES_DIR, **variables: Any) -> str:
    return _jinja(templates_dir).get_template(template).render(**variables)


def node_env(
    cluster: Cluster,
    node: Node,
    *,
    master_port: int,
    cpu_only: bool,
    venv: str,
    hf_home: str,
    mplconfigdir: str,
    cpus: int | None = None,
    system_path: str = SYSTEM_PATH,
    extra: Mapping[str, str] | None = None,
    npu: bool = False,
) -> dict[str, str]:
    """The environment of ``node``'s training processes.

    ``cpus``: the node's CPU count; OMP_NUM_THREADS is cpus // processes on a GPU stack, and 1 on a
    CPU stack or when unknown (CPU-stack nodes may share one machine's cores in tests).
    ``extra``: more variables (e.g. NCCL_P2P_DISABLE); they may override anything but the rendezvous.
    ``npu``: Ascend NPUs: ``ASCEND_RT_VISIBLE_DEVICES`` and ``HCCL_SOCKET_IFNAME`` (same syntax as NCCL's) instead
    of the CUDA/NCCL names, and ``HCCL_CONNECT_TIMEOUT`` (HCCL's rendezvous wait, 120-7200 s) unless given.
    """
    if not 1 <= master_port <= 65535:
        raise ConfigError(f"master port {master_port} is not a TCP port; use one in 1024-65535 free on the master")
    nproc = node.nproc(cpu_only)
    env = {
        "FORCE_TORCHRUN": "1",
        "NNODES": str(len(cluster.nodes)),
        "NODE_RANK": str(node.node_rank),
        "MASTER_ADDR": cluster.master.train_addr,
        "MASTER_PORT": str(master_port),
        "NPROC_PER_NODE": str(nproc),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": hf_home,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(max(1, cpus // nproc) if cpus and not cpu_only else 1),
        "MPLCONFIGDIR": mplconfigdir,
        # torchrun is looked up on PATH by llamafactory-cli: the stack's must come first.
        "PATH": f"{venv}/bin:{system_path}",
    }
    if node.cuda_visible_devices and not cpu_only:
        env["ASCEND_RT_VISIBLE_DEVICES" if npu else "CUDA_VISIBLE_DEVICES"] = node.cuda_visible_devices
    if node.nccl_socket_ifname:
        env["HCCL_SOCKET_IFNAME" if npu else "NCCL_SOCKET_IFNAME"] = node.nccl_socket_ifname
    if node.nccl_ib_disable is not None and not npu:
        env["NCCL_IB_DISABLE"] = "1" if node.nccl_ib_disable else "0"
    if npu:
        env["HCCL_CONNECT_TIMEOUT"] = "1800"
    for key, value in (extra or {}).items():
        if key in RENDEZVOUS_KEYS:
            fix = "remove it (NODE_RANK is set per node)" if key == "RANK" else "remove it: llamafleet sets it per node"
            raise ConfigError(f"extra environment variable {key}: {fix}")
        env[key] = str(value)
    return env


def check_env_names(env: Mapping[str, str]) -> None:
    bad = [k for k in env if not _ENV_NAME.match(k)]
    if bad:
        raise ConfigError(f"environment variable name {bad[0]!r} is not valid in a shell; use letters, digits and _")


def render_env_file(env: Mapping[str, str]) -> str:
    """``export KEY='value'`` lines, keys sorted, for a POSIX shell to source."""
    check_env_names(env)
    return render("node.env.j2", node_env=dict(env))


def _ds_slots(node: Node, cpu_only: bool) -> tuple[int, str | None]:
    """(hostfile slots, --include slot list or None) for a node.

    DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES itself, to the slot numbers it is given, so a
    node restricted to GPUs 4-7 needs slots 0-7 in the hostfile and ``host:4,5,6,7`` in --include.
    """
    if cpu_only or not node.cuda_visible_devices:
        return node.nproc(cpu_only), None
    ids = node.cuda_visible_devices
    return max(int(i) for i in ids.split(",")) + 1, ids


def hostfile_entries(cluster: Cluster, cpu_only: bool) -> list[dict[str, Any]]:
    """The DeepSpeed hostfile lines as ``{host, slots}``, in node-rank order.

    The host is the inventory name, not an address: with ``--no_ssh`` DeepSpeed never resolves it
    and only uses the line order for ranks, and names are unique where addresses may not be (two
    nodes on one machine). DeepSpeed rejects a host listed twice.
    """
    entries = []
    for node in sorted(cluster.nodes, key=lambda n: n.node_rank):
        if not _DS_LABEL.match(node.name):
            raise ConfigError(
                f"host {node.name}: the DeepSpeed launcher cannot name it in a hostfile (no whitespace, ':', '@' "
                "or leading '#'); rename the inventory host (set ansible_host to its address) or use launcher torchrun"
            )
        entries.append({"host": node.name, "slots": _ds_slots(node, cpu_only)[0]})
    return entries


def render_hostfile(cluster: Cluster, cpu_only: bool) -> str:
    return render("hostfile.j2", hostfile_entries=hostfile_entries(cluster, cpu_only))


def _no_whitespace(**paths: str) -> None:
    for what, path in paths.items():
        if re.search(r"\s", path):
            raise ConfigError(
                f"{what} {path!r} contains whitespace; LLaMA-Factory splits its torchrun command on whitespace, "
                "so choose a path without spaces"
            )


def accelerate_config(cluster: Cluster, node: Node, *, master_port: int, cpu_only: bool,
                       user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``node``'s accelerate config: the user's own (``user``, e.g. with ``fsdp_config``) with the keys of
    ``ACCELERATE_OWNED`` set from the inventory. accelerate runs ``num_processes / num_machines`` processes on
    every machine, so nodes with different process counts are refused with the launchers that can run them."""
    counts = {n.name: n.nproc(cpu_only) for n in cluster.nodes}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise ConfigError(f"the accelerate launcher runs the same number of processes on every node, but these nodes "
                          f"differ ({listed}); use --launcher torchrun or deepspeed (each node runs its own count), or "
                          "give every node the same llamafleet_gpus")
    cfg = dict(user or {})
    kind = str(cfg.get("distributed_type") or ("MULTI_CPU" if cpu_only else "MULTI_GPU")).upper()
    if cpu_only and kind in _ACCELERATE_GPU_ONLY:
        raise ConfigError(f"the accelerate config asks for distributed_type {kind}, which accelerate only runs on GPUs; "
                          "this stack is CPU-only: use a CUDA flavor, or MULTI_CPU (DDP over gloo)")
    cfg.update(compute_environment="LOCAL_MACHINE", distributed_type=kind, num_machines=len(cluster.nodes),
               machine_rank=node.node_rank, main_process_ip=cluster.master.train_addr, main_process_port=master_port,
               num_processes=cluster.world_size(cpu_only), use_cpu=cpu_only, rdzv_backend="static", same_network=True)
    cfg.setdefault("mixed_precision", "no")
    cfg.setdefault("main_training_function", "main")
    return cfg


def accelerate_env(cluster: Cluster, node: Node, cpu_only: bool) -> dict[str, str]:
    """What accelerate leaves to the environment: on a CPU stack it starts one process per node itself (no
    torchrun, no MPI), which learns its place in the world from these."""
    if not cpu_only:
        return {}
    return {"RANK": str(node.node_rank), "WORLD_SIZE": str(len(cluster.nodes)), "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1"}


def node_command(
    launcher: str,
    node: Node,
    cluster: Cluster,
    yaml_path: str,
    venv: str,
    *,
    master_port: int,
    cpu_only: bool,
    hostfile: str | None = None,
    site_packages: str | None = None,
) -> list[str]:
    """The argv that starts training on ``node``, run with ``node_env``'s environment.

    torchrun: ``llamafactory-cli train`` reads the rendezvous from the environment.
    deepspeed: DeepSpeed's runner, per node without ssh; needs ``hostfile`` (``render_hostfile``,
    same on every node) and ``site_packages`` of the venv's Python, where LLaMA-Factory's
    ``launcher.py`` is. ``--no_local_rank`` keeps ``--local_rank=N`` out of argv[1], where
    LLaMA-Factory expects the yaml.
    accelerate: ``accelerate launch`` with the node's ``accelerate.yaml`` (``accelerate_config``, beside the
    yaml) running LLaMA-Factory's ``launcher.py``.
    """
    _no_whitespace(yaml=yaml_path, venv=venv)
    if launcher == "torchrun":
        return [f"{venv}/bin/llamafactory-cli", "train", yaml_path]
    if launcher == "accelerate":
        if not site_packages:
            raise ConfigError("the accelerate launcher needs the venv's site-packages directory")
        config = yaml_path.rsplit("/", 1)[0] + "/accelerate.yaml"
        return [f"{venv}/bin/accelerate", "launch", "--config_file", config,
                f"{site_packages}/llamafactory/launcher.py", yaml_path]
    if launcher != "deepspeed":
        raise ConfigError(f"launcher {launcher!r} is not supported; use one of {', '.join(LAUNCHERS)}")
    if not hostfile or not site_packages:
        raise ConfigError("the deepspeed launcher needs the hostfile path and the venv's site-packages directory")
    command = [
        f"{venv}/bin/deepspeed", "--no_ssh",
        "--node_rank", str(node.node_rank),
        "--hostfile", hostfile,
        "--master_addr", cluster.master.train_addr,
        "--master_port", str(master_port),
    ]
    ordered = sorted(cluster.nodes, key=lambda n: n.node_rank)
    slots = [_ds_slots(n, cpu_only)[1] for n in ordered]
    if any(slots):
        # --include replaces the pool, so it names every host; a bare name takes all its slots.
        command += ["--include", "@".join(n.name if s is None else f"{n.name}:{s}" for n, s in zip(ordered, slots))]
    return command + ["--no_local_rank", f"{site_packages}/llamafactory/launcher.py", yaml_path]
