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
import json
import os
import re
import secrets
import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import fit, hub, launch, names, parity, trainconfig
from .errors import ConfigError
from .inventory import Cluster, Node
from .lock import Stack
from .rules import sha256_file

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
    hub_cache_dir: str  # this node's hub cache (hub repositories are fetched under it)
    model_check: dict[str, Any] | None  # the model directory to verify and compare across nodes, if not synced


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
    workdir: str = ""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # source, path or repo_id@commit
    inputs: tuple[dict[str, str], ...] = ()  # every input as the yaml names it, resolved, with its source
    hub: tuple[dict[str, Any], ...] = ()  # hub repositories the nodes fetch (llamafleet.cluster.fetch items)
    hub_endpoint: str = ""  # where the nodes fetch them from (HF_ENDPOINT)
    # the yaml's keys and template, checked against every node's LLaMA-Factory before any rank starts
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    # output_dir on storage every node shares (None: each node's run directory); rank 0 writes it, every
    # node must see the marker the master writes there (output_token) before anything starts
    shared_output_dir: str | None = None
    output_token: str = ""
    # memory per GPU, estimated (fit.for_plan): {"inputs", "estimate"}, {"skipped": why}, or {} on a CPU stack;
    # ``arguments`` carries it too, so that the launch judgement checks it against every node's GPU memory
    fit: dict[str, Any] = dataclasses.field(default_factory=dict)
    # bytes of the staged inputs (what a sync moves to a node that has none of them): the sync picks rsync per
    # node or the node-to-node fan-out by it (train_fanout, train_fanout_min_mb)
    inputs_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
            f"  inputs: {len(self.manifest)} files"
            + ("" if self.shared_inputs else f" ({self.inputs_bytes / 1e6:.1f} MB)") + ", "
            + ("verified in place (shared filesystem)" if self.shared_inputs
                                                        else "synced to <root>/inputs/" + self.job)
            + f"; relative paths from {self.workdir}",
        ]
        lines += [f"  {line}" for line in fit.plan_lines(self.fit)]
        lines += [f"    {i['key']}: {i['value']} -> {i['resolved']} ({i['source']})" for i in self.inputs]
        for n in sorted(self.nodes.values(), key=lambda n: n.node_rank):
            lines.append(f"  node rank {n.node_rank}: {n.name}" + (" (master)" if n.master else ""))
            if detail:
                lines.append(f"    run dir: {n.run_dir}")
                lines.append("    command: " + shlex.join(n.command))
                lines += [f"    {k}={REDACTED if is_secret(k) else shlex.quote(v)}" for k, v in sorted(n.env.items())]
        if detail and self.launcher == "deepspeed":
            lines.append("  hostfile:")
            lines += [f"    {line}" for line in self.hostfile.splitlines()]
        if detail and self.launcher == "accelerate":
            for name, node in sorted(self.nodes.items(), key=lambda kv: kv[1].node_rank):
                lines.append(f"  accelerate.yaml of {name}:")
                lines += [f"    {line}" for line in node.files.get("accelerate.yaml", "").splitlines()[1:]]
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
    if key not in cache:  # an unchanged file (same size, mtime, inode) is not read again
        cache[key] = sha256_file(path)
    return cache[key]


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (file or directory) made of hard links: no copy, same mtimes. Symlinks are
    followed (a hub cache snapshot is links to its blobs): the node gets the files themselves."""
    if src.is_dir():
        for item in src.rglob("*"):
            if item.is_file():
                _link_tree(item, dst / item.relative_to(src))
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:  # another filesystem
        shutil.copy2(real, dst)


def _stage(cfg: trainconfig.TrainingConfig, stage: Path, sync_model: bool, extra: list[tuple[str, str]],
           hub_paths: dict[str, str]) -> None:
    fresh = stage.with_name(stage.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for src, rel in trainconfig.node_files(cfg):
        if rel != trainconfig.NODE_MODEL_DIR or sync_model:
            _link_tree(Path(src), fresh / rel)
    for src, rel in extra:  # hub repositories fetched here
        _link_tree(Path(src), fresh / rel)
    info = fresh / trainconfig.NODE_DATA_DIR / trainconfig.DATASET_INFO
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps(trainconfig.node_dataset_info(cfg, hub_paths), indent=2, sort_keys=True) + "\n")
    # Its mtime follows the user's dataset_info.json, so an unchanged one is not transferred again.
    src_mtime = os.stat(cfg.dataset_info_path).st_mtime_ns if cfg.dataset_info_path else 0
    os.utime(info, ns=(src_mtime, src_mtime))
    shutil.rmtree(stage, ignore_errors=True)
    fresh.rename(stage)


HUB_FETCH = ("nodes", "controller")
NODE_HUB_DATA_DIR = "hubdata"


@dataclasses.dataclass
class _Hub:
    """The run's hub repositories, pinned: the model (if from a hub) and every hub dataset."""

    fetch: str  # nodes | controller
    endpoint: str
    token: str | None
    model: hub.HubRevision | None = None
    datasets: dict[str, hub.HubRevision] = dataclasses.field(default_factory=dict)
    local: dict[str, Path] = dataclasses.field(default_factory=dict)  # item name -> controller copy (fetch=controller)

    def items(self) -> list[dict[str, Any]]:
        """The repositories the nodes fetch themselves, as llamafleet.cluster.fetch takes them."""
        if self.fetch != "nodes":
            return []
        revs = ([("model", self.model)] if self.model else []) + [(f"dataset {n}", r) for n, r in self.datasets.items()]
        return [dict(r.to_dict(), name=name, cache_subdir=r.cache_subdir, model=name == "model") for name, r in revs]


def _pin_hub(cfg: trainconfig.TrainingConfig, fetch: str, env: dict[str, str], download_to: Path | None) -> _Hub:
    """Pin the model and hub datasets to commits (one call to the hub each); with ``fetch`` controller and a
    ``download_to`` directory, fetch them there too (they are then staged and synced like local inputs)."""
    if fetch not in HUB_FETCH:
        raise ConfigError(f"train_hub_fetch is {fetch!r}; use nodes (each node fetches from the hub or a mirror) "
                          "or controller (fetched once here, then synced: nodes without hub access)")
    endpoint, token = hub.endpoint_and_token(env)
    pinned = _Hub(fetch=fetch, endpoint=endpoint, token=token)
    if cfg.model.source == "hub":
        pinned.model = hub.resolve(cfg.model.hub or "huggingface", "model", cfg.model.repo_id or "",
                                   cfg.model.revision or "main", endpoint=endpoint, token=token,
                                   what=f"{cfg.path}: model_name_or_path")
    for ref in cfg.datasets:
        if ref.hub:
            pinned.datasets[ref.name] = hub.resolve(ref.hub, "dataset", ref.repo_id or "", "main", endpoint=endpoint,
                                                    token=token, what=f"{cfg.dataset_info_path}: dataset {ref.name!r}")
    if fetch == "controller" and download_to is not None:
        for name, rev in [("model", pinned.model)] + [(f"dataset {n}", r) for n, r in pinned.datasets.items()]:
            if rev is not None:
                pinned.local[name] = hub.download(rev, download_to, endpoint=endpoint, token=token)
    return pinned


def _inputs(cfg: trainconfig.TrainingConfig, pinned: _Hub, shared: bool,
            shared_output: str | None) -> list[dict[str, str]]:
    """Every input the yaml names, resolved against the working directory, with where it comes from."""
    synced = "controller, verified in place on every node" if shared else "controller, synced"
    m = cfg.model
    if m.source == "hub" and pinned.model:
        how = "fetched by every node" if pinned.fetch == "nodes" else "fetched once on the controller, synced"
        model = (f"{pinned.model.label} on {pinned.model.hub}" + (f" at {pinned.endpoint}" if m.hub == "huggingface"
                                                                   else ""), f"hub, {how}")
    elif m.source == "nodes":
        model = (m.path or "", "nodes: already there, verified and compared on every node, not copied")
    else:
        model = (m.path or "", synced)
    rows = [{"key": "model_name_or_path", "value": m.value, "resolved": model[0], "source": model[1]},
            {"key": "dataset_dir", "value": str(cfg.data.get("dataset_dir", "data")), "resolved": cfg.dataset_dir,
             "source": synced}]
    for ref in cfg.datasets:
        if ref.hub:
            rev = pinned.datasets[ref.name]
            rows.append({"key": f"dataset {ref.name}", "value": ref.repo_id or "", "resolved": rev.label,
                         "source": f"hub ({ref.hub}), " + ("fetched by every node" if pinned.fetch == "nodes"
                                                          else "fetched once on the controller, synced")})
        else:
            rows.append({"key": f"dataset {ref.name}", "value": str(ref.entry.get("file_name")),
                         "resolved": ref.path or "", "source": synced})
    if cfg.deepspeed_path:
        rows.append({"key": "deepspeed", "value": str(cfg.data["deepspeed"]), "resolved": cfg.deepspeed_path,
                     "source": synced})
    for ref in cfg.adapters + ((cfg.tokenized,) if cfg.tokenized else ()):
        source = {"controller": synced, "nodes": "nodes: used where it is",
                  "run": "written by rank 0 into the run directory"}[ref.source]
        rows.append({"key": ref.key, "value": ref.value, "resolved": ref.path, "source": source})
    if shared_output:
        rows.append({"key": "output_dir", "value": str(cfg.data.get("output_dir")), "resolved": shared_output,
                     "source": "shared storage: rank 0 writes it, every node reads it in place, collected once"})
    else:
        rows.append({"key": "output_dir", "value": str(cfg.data.get("output_dir")),
                     "resolved": "<root>/runs/<run_id>/output", "source": "written on the nodes, collected to the controller"})
    return rows


def _node_model(cfg: trainconfig.TrainingConfig, pinned: _Hub, cache_dir: str, inputs_dir: str,
                model_synced: bool) -> tuple[str | None, dict[str, Any] | None]:
    """(model_name_or_path on the node, what the node's check fingerprints) for the model's source."""
    if cfg.model.source == "hub" and pinned.model is not None:
        if pinned.fetch == "controller":
            return os.path.join(inputs_dir, trainconfig.NODE_MODEL_DIR), None
        path = os.path.join(cache_dir, pinned.model.cache_subdir)
        return path, {"path": path, "files": pinned.model.files}
    if cfg.model.source == "nodes" or (cfg.model.source == "controller" and not model_synced):
        return cfg.model.path, {"path": cfg.model.path, "files": {}}
    return None, None


def _manifest(cfg: trainconfig.TrainingConfig, state: Path, job: str, shared_inputs: bool, model_synced: bool,
              pinned: _Hub) -> tuple[dict[str, str], str | None, dict[str, str]]:
    """(manifest, stage directory, hub dataset name -> its path relative to a node's run directory).

    Synced inputs are staged under <state>/stage/<job> by hard links and checksummed there; shared ones
    are checksummed where they are. The sha256 of a file is cached by path, size, mtime and inode."""
    cache_file = state / "cache" / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    manifest: dict[str, str] = {}
    # From a node's run directory (<root>/runs/<id>), where training starts: the same on every node.
    to_root = os.path.join(os.pardir, os.pardir)
    hub_paths = {}
    for name, rev in pinned.datasets.items():
        hub_paths[name] = os.path.join(to_root, "inputs", job, NODE_HUB_DATA_DIR, name) if pinned.fetch == "controller" \
            else os.path.join(to_root, HUB_CACHE, rev.cache_subdir)
    if shared_inputs:
        if pinned.datasets or pinned.model:
            raise ConfigError(f"{cfg.path}: hub models and datasets cannot be used with shared inputs; give their "
                              "directories on the shared filesystem instead, or leave shared inputs off")
        stage_dir = None
        for f in cfg.files:
            p = Path(f)
            for item in ([x for x in p.rglob("*") if x.is_file()] if p.is_dir() else [p]):
                manifest[str(item).lstrip("/")] = _hash_file(item, cache)
    else:
        extra = [(str(path), trainconfig.NODE_MODEL_DIR if name == "model" else
                  os.path.join(NODE_HUB_DATA_DIR, name.split(" ", 1)[1])) for name, path in pinned.local.items()]
        stage = state / "stage" / job
        _stage(cfg, stage, model_synced, extra, hub_paths)
        stage_dir = str(stage)
        for item in sorted(stage.rglob("*")):
            if item.is_file():
                manifest[str(item.relative_to(stage))] = _hash_file(item, cache)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # keep only entries of files that still exist: the cache never grows without bound
    cache_file.write_text(json.dumps({k: v for k, v in cache.items() if os.path.exists(k.rsplit(":", 3)[0])}))
    return manifest, stage_dir, hub_paths


def _check_for_stack(cfg: trainconfig.TrainingConfig, stack: Stack, state_dir: str | os.PathLike,
                     extra_env: dict[str, str]) -> dict[str, Any]:
    """Refuse what the nodes would refuse at start: precision this stack cannot run, and keys or a template
    their LLaMA-Factory does not know (as the last provision or launch recorded it). Returns what the launch
    checks again against every node."""
    arguments = {"path": cfg.path, "keys": sorted(cfg.data), "template": cfg.data.get("template"),
                 "allow_extra": extra_env.get("ALLOW_EXTRA_ARGS", "").lower() in ("1", "true")}
    surface = parity.load_llamafactory(state_dir, stack.venv_name) if not arguments["allow_extra"] else None
    problems = trainconfig.check_precision(cfg, stack.cpu_only) + trainconfig.check_arguments(
        cfg.path, arguments["keys"], arguments["template"], surface or {}, f"the nodes' stack-{stack.hash}")
    if problems:
        raise ConfigError(problems)
    return arguments


def _model_summary(cfg: trainconfig.TrainingConfig, pinned: _Hub) -> tuple[dict[str, Any], list[str]]:
    """The plan's record of the model (source, path or pinned commit) and the warnings about inputs."""
    model = {"source": cfg.model.source, "value": cfg.model.value, "path": cfg.model.path,
             "label": pinned.model.label if pinned.model else cfg.model.path or cfg.model.value,
             **({"hub": pinned.model.to_dict(), "fetch": pinned.fetch} if pinned.model else {})}
    warnings = list(cfg.warnings) + [f"{r.repo_id}: the sizes of its files at {r.commit} could not be listed "
                                     "(the controller cannot reach the hub); the nodes' copies are only compared "
                                     "with each other" for r in [pinned.model, *pinned.datasets.values()]
                                     if r is not None and r.hub == "huggingface" and not r.files]
    return model, warnings


def _shared_output(cfg: trainconfig.TrainingConfig) -> str:
    """The yaml's output_dir as every node sees it on shared storage: an absolute path (a relative one would
    be relative to each node's own working directory)."""
    value = cfg.data.get("output_dir")
    if not isinstance(value, str) or not os.path.isabs(os.path.expanduser(value)):
        raise ConfigError(f"{cfg.path}: output_dir: is {value!r}; with shared output it must be the absolute path "
                          "every node sees on the shared storage (e.g. /nfs/saves/qwen3-lora)")
    return os.path.normpath(os.path.expanduser(value))


# a node's hub cache, under its llamafleet root (HF_HOME is <root>/cache/huggingface)
HUB_CACHE = "cache/huggingface/hub"


def _user_accelerate(path: str | None, workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The user's own accelerate config (relative to the working directory, as accelerate reads it), or None."""
    if not path:
        return None
    full = Path(workdir) / path
    if not full.is_file():
        raise ConfigError(f"accelerate config {path} not found (looked for {full}; relative paths start at the "
                          "working directory): fix train_accelerate_config (--accelerate-config)")
    try:
        data = yaml.safe_load(full.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"accelerate config {full} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"accelerate config {full} is not a mapping of settings (accelerate config's format)")
    return data


def _node_env(cluster: Cluster, node: Node, stack: Stack, *, launcher: str, root: str, venv: str, run_id: str,
              master_port: int, cpus: int | None, extra_env: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the node's variables that node.env may hold, all of them with secret values REDACTED for the plan).
    The secret values stay out of the plan: the train module gets them."""
    env = launch.node_env(cluster, node, master_port=master_port, cpu_only=stack.cpu_only, venv=venv, npu=stack.npu,
                          hf_home=f"{root}/cache/huggingface", mplconfigdir=f"{root}/cache/matplotlib", cpus=cpus,
                          extra={"TORCH_EXTENSIONS_DIR": f"{root}/cache/torch_extensions",
                                 "LLAMAFLEET_RUN_ID": run_id, **extra_env})
    if launcher == "accelerate":
        env.update(launch.accelerate_env(cluster, node, stack.cpu_only))
    launch.check_env_names(env)
    public, _secret = split_secrets(env)
    return public, redact_env(env)


def _node_files(cluster: Cluster, node: Node, *, config: str, data: dict[str, Any], public_env: dict[str, Any],
                hostfile_text: str, launcher: str, master_port: int, cpu_only: bool,
                user_accelerate: dict[str, Any] | None) -> dict[str, str]:
    """The files of the node's run directory: train.yaml, node.env, hostfile (and accelerate.yaml)."""
    files = {"train.yaml": "# Generated by llamafleet from " + config + "\n" + yaml.safe_dump(data, sort_keys=False),
             "node.env": launch.render_env_file(public_env), "hostfile": hostfile_text}
    if launcher == "accelerate":
        files["accelerate.yaml"] = "# Generated by llamafleet: this node's accelerate config\n" + yaml.safe_dump(
            launch.accelerate_config(cluster, node, master_port=master_port, cpu_only=cpu_only,
                                     user=user_accelerate), sort_keys=True)
    return files


def make_plan(config: str | os.PathLike, cluster: Cluster, stack: Stack, *, state_dir: str | os.PathLike,
              workdir: str | os.PathLike | None = None, launcher: str = "torchrun", master_port: int = 29500,
              run_id: str | None = None, job: str | None = None, shared_inputs: bool = False, sync_model: bool = True,
              shared_output: bool = False,
              model_source: str = "auto", hub_fetch: str = "nodes", fetch_now: bool = True, cpus: int | None = None,
              extra_env: dict[str, str] | None = None, accelerate_config: str | None = None) -> LaunchPlan:
    """Validate ``config`` (relative paths from ``workdir``, default this process's), pin its hub inputs,
    stage and checksum its inputs, and render what every node gets. ``fetch_now`` False (a dry run)
    pins hub repositories but fetches nothing, even with ``hub_fetch`` controller."""
    if launcher not in launch.LAUNCHERS:
        raise ConfigError(f"train_launcher is {launcher!r}; use one of: {', '.join(launch.LAUNCHERS)}")
    config = os.path.abspath(config)
    extra_env = dict(extra_env or {})
    job = job_name(config, job)  # names of directories the plan replaces: checked before anything else
    run_id = names.check_name(run_id, "run id (train_run_id)") if run_id else new_run_id(job)
    if not sync_model and model_source == "auto":
        model_source = "nodes"
    cfg = trainconfig.load_training(config, workdir=workdir, model_source=model_source, hub=hub.hub_of(extra_env))
    cpu_only = stack.cpu_only
    arguments = _check_for_stack(cfg, stack, state_dir, extra_env)
    plan = trainconfig.plan(cfg, cluster, cpu_only)
    state = Path(state_dir)
    pinned = _pin_hub(cfg, hub_fetch, extra_env, state / HUB_CACHE if fetch_now else None)
    model_synced = bool(cfg.model_dir) and sync_model
    manifest, stage_dir, hub_paths = _manifest(cfg, state, job, shared_inputs, model_synced, pinned)
    shared_output = _shared_output(cfg) if shared_output else None
    nodes: dict[str, NodeLaunch] = {}
    hostfile_text = launch.render_hostfile(cluster, cpu_only)
    user_accelerate = _user_accelerate(accelerate_config, cfg.workdir) if launcher == "accelerate" else None
    for node in cluster.nodes:
        root = node.root.rstrip("/")
        inputs_dir = "/" if shared_inputs else f"{root}/inputs/{job}"
        run_dir = f"{root}/runs/{run_id}"
        venv = f"{root}/stacks/{stack.venv_name}"
        cache_dir = f"{root}/{HUB_CACHE}"
        model_path, model_check = _node_model(cfg, pinned, cache_dir, inputs_dir, model_synced)
        data = trainconfig.rewrite_for_node(cfg, inputs_dir, run_dir=run_dir, model_path=model_path,
                                            shared_inputs=shared_inputs, output_dir=shared_output)
        public, env = _node_env(cluster, node, stack, launcher=launcher, root=root, venv=venv, run_id=run_id,
                                master_port=master_port, cpus=cpus, extra_env=extra_env)
        command = launch.node_command(launcher, node, cluster, f"{run_dir}/train.yaml", venv, master_port=master_port,
                                      cpu_only=cpu_only, hostfile=f"{run_dir}/hostfile",
                                      site_packages=f"{venv}/lib/python{stack.python}/site-packages")
        files = _node_files(cluster, node, config=config, data=data, public_env=public, hostfile_text=hostfile_text,
                            launcher=launcher, master_port=master_port, cpu_only=cpu_only,
                            user_accelerate=user_accelerate)
        nodes[node.name] = NodeLaunch(name=node.name, node_rank=node.node_rank, master=node.master,
                                      inputs_dir=inputs_dir, run_dir=run_dir, env=env, command=command, files=files,
                                      hub_cache_dir=cache_dir, model_check=model_check)
    model, warnings = _model_summary(cfg, pinned)
    fit_estimate = fit.for_plan(cfg, plan.world_size, cpu_only, (cfg.model.path, pinned.local.get("model")),
                                pinned.model.files if pinned.model else None, user_accelerate)
    return LaunchPlan(run_id=run_id, job=job, launcher=launcher, config=config, master_addr=cluster.master.train_addr,
                      master_port=master_port, shared_inputs=shared_inputs, stage_dir=stage_dir, manifest=manifest,
                      plan=plan.to_dict(), nodes=nodes, hostfile=hostfile_text, warnings=tuple(warnings),
                      workdir=cfg.workdir, model=model, inputs=tuple(_inputs(cfg, pinned, shared_inputs, shared_output)),
                      hub=tuple(pinned.items()), hub_endpoint=pinned.endpoint,
                      arguments={**arguments, "fit": fit_estimate}, fit=fit_estimate,
                      shared_output_dir=shared_output, output_token=secrets.token_hex(16) if shared_output else "",
                      inputs_bytes=sum((Path(stage_dir) / rel).stat().st_size for rel in manifest) if stage_dir else 0)
