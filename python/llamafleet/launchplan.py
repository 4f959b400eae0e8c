"""A training run, planned on the controller: what every node gets and runs.

``make_plan`` validates the user's unchanged LLaMA-Factory yaml (``trainconfig``), stages the inputs
it needs (hard links, so staging costs no copy), checksums them into a manifest, and renders each
node's files from ``templates/`` (``launch``): its yaml with node paths, its environment with its
rank, the DeepSpeed hostfile, and the command. The ``llamafleet.cluster.train_plan`` action calls
it; ``--dry-run`` prints the same plan.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import launch, names, trainconfig
from .errors import ConfigError
from .inventory import Cluster
from .lock import Stack

# Names of variables whose values are secrets (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...);
# TOKENIZERS_PARALLELISM is a setting, not a token. The one rule: a plan holds only REDACTED for them
# and its node.env leaves them out; their values travel apart (split_secrets), to the train module's
# no_log option secret_env, which appends them to the node's node.env (mode 0600) and nowhere else.
_SECRET = re.compile(r"TOKEN(?!IZER)|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY", re.I)
REDACTED = "***"


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def split_secrets(env: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(the variables that may be shown and logged, the secret ones as strings)."""
    public, secret = {}, {}
    for key, value in (env or {}).items():
        if is_secret(key):
            secret[key] = str(value)
        else:
            public[key] = value
    return public, secret


def redact_env(env: dict[str, Any]) -> dict[str, Any]:
    return {k: REDACTED if is_secret(k) else v for k, v in env.items()}


@dataclasses.dataclass(frozen=True)
class NodeLaunch:
    name: str
    node_rank: int
    master: bool
    inputs_dir: str
    run_dir: str
    env: dict[str, str]
    command: list[str]
    files: dict[str, str]  # run-directory file name -> content


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    run_id: str
    job: str
    launcher: str
    config: str
    master_addr: str
    master_port: int
    shared_inputs: bool
    stage_dir: str | None
    manifest: dict[str, str]  # path relative to the node's inputs dir -> sha256
    plan: dict[str, Any]
    nodes: dict[str, NodeLaunch]
    hostfile: str
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchPlan":
        nodes = {k: NodeLaunch(**v) for k, v in d["nodes"].items()}
        return cls(**{**d, "nodes": nodes, "warnings": tuple(d.get("warnings", ()))})

    def format(self, detail: bool = False) -> str:
        p = self.plan
        lines = [
            f"run {self.run_id}: {self.config} with the {self.launcher} launcher",
            f"  nodes {len(self.nodes)}, world size {p['world_size']}, master {p['master']} at "
            f"{self.master_addr}:{self.master_port}",
            f"  effective batch {p['effective_batch']} = {p['per_device_batch']} per device x {p['world_size']} "
            f"processes x {p['gradient_accumulation']} accumulation",
            f"  samples {p['train_samples'] if p['train_samples'] is not None else '?'}, steps per epoch "
            f"{p['steps_per_epoch'] if p['steps_per_epoch'] is not None else '?'}, total steps "
            f"{p['total_steps'] if p['total_steps'] is not None else '?'}",
            f"  inputs: {len(self.manifest)} files, " + ("verified in place (shared filesystem)" if self.shared_inputs
                                                        else "synced to <root>/inputs/" + self.job),
        ]
        for n in sorted(self.nodes.values(), key=lambda n: n.node_rank):
            lines.append(f"  node rank {n.node_rank}: {n.name}" + (" (master)" if n.master else ""))
            if detail:
                lines.append(f"    run dir: {n.run_dir}")
                lines.append("    command: " + shlex.join(n.command))
                lines += [f"    {k}={REDACTED if is_secret(k) else shlex.quote(v)}" for k, v in sorted(n.env.items())]
        if detail and self.launcher == "deepspeed":
            lines.append("  hostfile:")
            lines += [f"    {line}" for line in self.hostfile.splitlines()]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def new_run_id(job: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{job}-{secrets.token_hex(2)}"


def job_name(config: str | os.PathLike, name: str | None = None) -> str:
    """The job's name (``train_job``, else the config's file name), normalised, then checked
    (``names.check_name``): it names directories that a plan replaces."""
    raw = name or Path(config).stem
    what = "train_job" if name else f"the job name taken from {Path(config).name} (set train_job)"
    if "/" in raw or ".." in raw or raw[:1] in (".", "-"):
        names.check_name(raw, what)  # names the value as given
    job = names.normalize_job(raw)
    return names.check_name(job, what if job == raw else f"{what} {raw!r} normalised to")


def _hash_file(path: Path, cache: dict[str, Any]) -> str:
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (file or directory) made of hard links: no copy, same mtimes."""
    if src.is_dir():
        for item in src.rglob("*"):
            if item.is_file():
                _link_tree(item, dst / item.relative_to(src))
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _stage(cfg: trainconfig.TrainingConfig, stage: Path, sync_model: bool) -> None:
    fresh = stage.with_name(stage.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for src, rel in trainconfig.node_files(cfg):
        if rel == trainconfig.NODE_MODEL_DIR and not sync_model:
            continue
        _link_tree(Path(src), fresh / rel)
    info = fresh / trainconfig.NODE_DATA_DIR / trainconfig.DATASET_INFO
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps(trainconfig.node_dataset_info(cfg), indent=2, sort_keys=True) + "\n")
    # Its mtime follows the user's dataset_info.json, so an unchanged one is not transferred again.
    src_mtime = os.stat(cfg.dataset_info_path).st_mtime_ns if cfg.dataset_info_path else 0
    os.utime(info, ns=(src_mtime, src_mtime))
    shutil.rmtree(stage, ignore_errors=True)
    fresh.rename(stage)


def make_plan(config: str | os.PathLike, cluster: Cluster, stack: Stack, *, state_dir: str | os.PathLike,
              launcher: str = "torchrun", master_port: int = 29500, run_id: str | None = None,
              job: str | None = None, shared_inputs: bool = False, sync_model: bool = True,
              cpus: int | None = None, extra_env: dict[str, str] | None = None) -> LaunchPlan:
    if launcher not in launch.LAUNCHERS:
        raise ConfigError(f"train_launcher is {launcher!r}; use one of: {', '.join(launch.LAUNCHERS)}")
    config = os.path.abspath(config)
    cfg = trainconfig.load_training(config)
    cpu_only = stack.cuda is None
    plan = trainconfig.plan(cfg, cluster, cpu_only)
    job = job_name(config, job)
    run_id = names.check_name(run_id, "run id (train_run_id)") if run_id else new_run_id(job)
    state = Path(state_dir)
    cache_file = state / "cache" / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    manifest: dict[str, str] = {}
    warnings = list(cfg.warnings)
    model_synced = bool(cfg.model_dir) and sync_model
    if shared_inputs:
        stage_dir = None
        for f in cfg.files:
            p = Path(f)
            for item in ([x for x in p.rglob("*") if x.is_file()] if p.is_dir() else [p]):
                manifest[str(item).lstrip("/")] = _hash_file(item, cache)
    else:
        stage = state / "stage" / job
        _stage(cfg, stage, model_synced)
        stage_dir = str(stage)
        for item in sorted(stage.rglob("*")):
            if item.is_file():
                manifest[str(item.relative_to(stage))] = _hash_file(item, cache)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # keep only entries of files that still exist: the cache never grows without bound
    cache_file.write_text(json.dumps({k: v for k, v in cache.items() if os.path.exists(k.rsplit(":", 3)[0])}))
    nodes: dict[str, NodeLaunch] = {}
    hostfile_text = launch.render_hostfile(cluster, cpu_only)
    minor = stack.python
    for node in cluster.nodes:
        root = node.root.rstrip("/")
        inputs_dir = "/" if shared_inputs else f"{root}/inputs/{job}"
        run_dir = f"{root}/runs/{run_id}"
        venv = f"{root}/stacks/{stack.venv_name}"
        if shared_inputs:
            data = dict(cfg.data)
            data["dataset_dir"] = cfg.dataset_dir
            if cfg.deepspeed_path:
                data["deepspeed"] = cfg.deepspeed_path
            if cfg.model_dir:
                data["model_name_or_path"] = cfg.model_dir
            data["data_shared_file_system"] = True
        else:
            data = trainconfig.rewrite_for_node(cfg, inputs_dir)
            if cfg.model_dir and not model_synced:
                data["model_name_or_path"] = cfg.model_dir
        data["output_dir"] = f"{run_dir}/output"
        env = launch.node_env(cluster, node, master_port=master_port, cpu_only=cpu_only, venv=venv,
                              hf_home=f"{root}/cache/huggingface", mplconfigdir=f"{root}/cache/matplotlib", cpus=cpus,
                              extra={"TORCH_EXTENSIONS_DIR": f"{root}/cache/torch_extensions",
                                     "LLAMAFLEET_RUN_ID": run_id, **(extra_env or {})})
        launch.check_env_names(env)
        public, _secret = split_secrets(env)  # the values stay out of the plan: the train module gets them
        env = redact_env(env)
        command = launch.node_command(launcher, node, cluster, f"{run_dir}/train.yaml", venv, master_port=master_port,
                                      cpu_only=cpu_only, hostfile=f"{run_dir}/hostfile",
                                      site_packages=f"{venv}/lib/python{minor}/site-packages")
        files = {"train.yaml": "# Generated by llamafleet from " + config + "\n" + yaml.safe_dump(data, sort_keys=False),
                 "node.env": launch.render_env_file(public), "hostfile": hostfile_text}
        nodes[node.name] = NodeLaunch(name=node.name, node_rank=node.node_rank, master=node.master,
                                      inputs_dir=inputs_dir, run_dir=run_dir, env=env, command=command, files=files)
    return LaunchPlan(run_id=run_id, job=job, launcher=launcher, config=config, master_addr=cluster.master.train_addr,
                      master_port=master_port, shared_inputs=shared_inputs, stage_dir=stage_dir, manifest=manifest,
                      plan=plan.to_dict(), nodes=nodes, hostfile=hostfile_text, warnings=tuple(warnings))
