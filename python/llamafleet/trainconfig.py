"""A user's LLaMA-Factory training yaml, checked on the controller and rewritten for the nodes.

``load_training`` reads the yaml unchanged and applies LLaMA-Factory 0.9.5's own rules (its
``hparams`` and ``data/parser.py``, ``data/loader.py``, ``data/converter.py``) to everything it
references, so mistakes surface on the controller, all at once, instead of as a traceback on one
node after minutes of setup.

Paths: LLaMA-Factory, transformers and DeepSpeed resolve relative paths (``model_name_or_path``,
``dataset_dir``, ``deepspeed``, ``adapter_name_or_path``, ``tokenized_path``, ``output_dir``) against
the working directory of ``llamafactory-cli``, so llamafleet resolves them against ``workdir``: the
directory the command runs from, as with ``llamafactory-cli train examples/x.yaml`` in a
LLaMA-Factory checkout. ``rewrite_for_node`` then turns them into absolute paths on the node.

The model has one of three sources (``ModelRef``): a directory on the controller (synced), a path
that already exists on the nodes (their disks or a shared mount; verified there, never copied), or
a hub id (Hugging Face, or ModelScope with ``USE_MODELSCOPE_HUB=1``), pinned to a commit and fetched
before any rank starts (``launchplan``, ``hub``).

The yaml is parsed like LLaMA-Factory parses it (OmegaConf): ``1e-4`` is a float (plain YAML 1.1
reads it as a string), timestamps stay strings and duplicate keys are an error.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from .errors import ConfigError
from .inventory import Cluster

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto")
FINETUNING_TYPES = ("lora", "oft", "freeze", "full")
FORMATS = ("alpaca", "sharegpt", "openai")
# LLaMA-Factory's FILEEXT2TYPE: the extension decides the `datasets` loader.
FILE_TYPES = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
# dataset_info.json keys that make LLaMA-Factory download instead of reading dataset_dir.
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# Of those, the hub datasets llamafleet fetches before the run (and the hub each belongs to).
HUB_KEYS = {"hf_hub_url": "huggingface", "ms_hub_url": "modelscope"}
# Stages whose datasets must be pairwise (`ranking: true`): dpo loads its data as stage "rm".
RANKING_STAGES = ("rm", "dpo")
DATASET_INFO = "dataset_info.json"
# Records read from the start of each data file to check columns and message tags.
INSPECT_RECORDS = 100

# Layout of a job directory on a node (relative paths).
NODE_DATA_DIR = "data"
NODE_MODEL_DIR = "model"
NODE_DEEPSPEED_DIR = "deepspeed"
NODE_OUTPUT_DIR = "output"

_COLUMN_ATTRS = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag"),
    "sharegpt": ("messages", "system", "tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag"),
}
_COLUMN_ATTRS["openai"] = _COLUMN_ATTRS["sharegpt"]
# DatasetAttr's defaults; once an entry has "columns" (or "tags"), every key it leaves out is None.
_DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
_DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_ROLE_TAGS = ("user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Loader(yaml.SafeLoader):
    """YAML as OmegaConf (LLaMA-Factory's reader) sees it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key_node.value}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """One dataset named by ``dataset`` or ``eval_dataset``, as dataset_info.json defines it."""

    name: str
    split: str  # "train" or "eval": which yaml key named it
    entry: dict[str, Any]  # its dataset_info.json entry
    path: str | None  # absolute ``file_name`` (a file or a directory); None for a hub dataset
    files: tuple[str, ...]  # the data files LLaMA-Factory reads
    samples: int | None  # records after num_samples and max_samples; None when not countable here
    hub: str | None = None  # huggingface | modelscope: a hub dataset, fetched before the run
    repo_id: str | None = None


MODEL_SOURCES = ("auto", "controller", "nodes", "hub")
HUBS = ("huggingface", "modelscope")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where ``model_name_or_path`` comes from.

    ``controller``: ``path`` is a directory on the controller, synced to every node.
    ``nodes``: ``path`` already exists on every node (its disk or a shared mount): verified on each
    node and compared across nodes before any rank starts, never copied.
    ``hub``: ``repo_id`` at ``revision`` (``model_revision``) on ``hub``, pinned to a commit and
    fetched before any rank starts; training reads the fetched copy with the hub offline.
    """

    value: str  # as the yaml says it
    source: str  # controller | nodes | hub
    path: str | None = None
    hub: str | None = None
    repo_id: str | None = None
    revision: str | None = None


@dataclasses.dataclass(frozen=True)
class PathInput:
    """A yaml path key other than the model: ``value`` as written, ``path`` resolved, and its source:
    ``controller`` (synced), ``nodes`` (used as it is on the nodes) or ``run`` (written by the run)."""

    key: str
    value: str
    path: str
    source: str


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """A training yaml that passed every check. ``data`` is the parsed yaml, unchanged."""

    path: str
    data: dict[str, Any]
    dataset_dir: str
    dataset_info_path: str | None
    datasets: tuple[DatasetRef, ...]
    deepspeed_path: str | None
    zero_stage: int | None
    model: ModelRef
    warnings: tuple[str, ...]
    workdir: str = ""  # relative paths of the yaml are relative to it
    adapters: tuple[PathInput, ...] = ()  # adapter_name_or_path, in order
    tokenized: PathInput | None = None  # tokenized_path

    @property
    def model_dir(self) -> str | None:
        """The model's directory on the controller (source ``controller``), else None."""
        return self.model.path if self.model.source == "controller" else None

    @property
    def train_samples(self) -> int | None:
        """Training records: the ``dataset`` samples less the ``val_size`` split (as ``train_test_split``)."""
        counts = [d.samples for d in self.datasets if d.split == "train"]
        if not counts or None in counts:
            return None
        total = sum(counts)
        val_size = float(self.data.get("val_size") or 0)
        if val_size > 1e-6:
            total -= int(val_size) if val_size > 1 else math.ceil(val_size * total)
        return max(total, 0)

    @property
    def files(self) -> tuple[str, ...]:
        """Absolute path of every file or directory the training reads from the controller."""
        paths = [self.dataset_info_path] if self.dataset_info_path else []
        paths += [f for d in self.datasets for f in d.files]
        paths += [p for p in (self.deepspeed_path, self.model_dir) if p]
        paths += [a.path for a in self.adapters if a.source == "controller"]
        if self.tokenized and self.tokenized.source == "controller":
            paths.append(self.tokenized.path)
        return tuple(dict.fromkeys(paths))


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What a training run will do on a cluster: ranks, world size and step counts."""

    nodes: tuple[dict[str, Any], ...]  # name, node_rank, train_addr, nproc, in rank order
    master: str
    master_addr: str
    world_size: int
    per_device_batch: int
    gradient_accumulation: int
    effective_batch: int
    train_samples: int | None
    steps_per_epoch: int | None
    total_steps: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_training(
    yaml_path: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str] | None = None,
    templates: Collection[str] | None = None,
    model_source: str = "auto",
    hub: str = "huggingface",
) -> TrainingConfig:
    """Read and check a LLaMA-Factory training yaml; raise ``ConfigError`` listing every problem.

    ``workdir``: the directory relative paths are resolved against, as ``llamafactory-cli`` resolves
    them against its working directory (default: this process's).
    ``templates``: the valid ``template`` names; None accepts any.
    ``model_source``: one of MODEL_SOURCES (``auto``: a directory on the controller, else an absolute
    path on the nodes, else a hub id). ``hub``: the hub of hub ids and hub datasets (HUBS).
    """
    path = os.path.abspath(yaml_path)
    base = os.path.abspath(workdir or os.getcwd())
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the training yaml ({err.strerror}); check the path") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(err)}; fix the syntax at that line") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the training yaml must be a mapping of LLaMA-Factory arguments (key: value lines), "
            f"not {type(data).__name__}"
        )
    if model_source not in MODEL_SOURCES:
        raise ConfigError(f"train_model_source is {model_source!r}; use one of {', '.join(MODEL_SOURCES)}")
    report = _Report(path, base)
    _check_method(data, templates, report)
    _check_numbers(data, report)
    model = _check_model(data, model_source, hub, report)
    deepspeed_path, zero_stage = _check_deepspeed(data, report)
    dataset_dir, info_path, datasets = _check_datasets(data, hub, report)
    adapters = _check_adapters(data, report)
    tokenized = _path_input(data, "tokenized_path", report)
    if report.problems:
        raise ConfigError(report.problems)
    return TrainingConfig(
        path=path,
        data=data,
        dataset_dir=dataset_dir,
        dataset_info_path=info_path,
        datasets=datasets,
        deepspeed_path=deepspeed_path,
        zero_stage=zero_stage,
        model=model,
        warnings=tuple(report.warnings),
        workdir=base,
        adapters=adapters,
        tokenized=tokenized,
    )


@dataclasses.dataclass
class _Report:
    """Problems and warnings found so far, each prefixed with where it is: the yaml, or ``where``."""

    path: str
    base: str  # the working directory: relative paths in the yaml are resolved against it
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def problem(self, key: str, text: str, where: str | None = None) -> None:
        self.problems.append(f"{where or self.path}: {key}: {text}")

    def warn(self, key: str, text: str, where: str | None = None) -> None:
        self.warnings.append(f"{where or self.path}: {key}: {text}")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _check_method(data: dict[str, Any], templates: Collection[str] | None, report: _Report) -> None:
    stage = data.get("stage", "sft")
    if stage not in STAGES:
        report.problem("stage", f"{stage!r} is not a LLaMA-Factory stage; use one of {', '.join(STAGES)}")
    ftype = data.get("finetuning_type", "lora")
    if ftype not in FINETUNING_TYPES:
        report.problem("finetuning_type", f"{ftype!r} is not supported; use one of {', '.join(FINETUNING_TYPES)}")
    template = data.get("template")
    if template is None:
        report.warn("template", "not set; LLaMA-Factory then parses the tokenizer's chat template or uses 'empty'; "
                    "set the template your model was trained with, e.g. template: qwen")
    elif not isinstance(template, str) or not template.strip():
        report.problem("template", f"{template!r} is not a template name; set e.g. template: qwen")
    elif templates is not None and template not in templates:
        report.problem("template", f"{template!r} is not a template of the installed LLaMA-Factory; check the spelling")
    if data.get("do_train") is not True:
        report.problem("do_train", f"is {data.get('do_train')!r}; llamafleet runs training jobs: set do_train: true")
    if not isinstance(data.get("output_dir"), str) or not data["output_dir"].strip():
        report.problem("output_dir", "is not set; set it to a directory name (llamafleet puts it in the job directory)")


def _number(value: Any, kind: type) -> int | float | None:
    """The value when it is a number of ``kind`` (an int passes as a float; a bool is no number), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int and not isinstance(value, int):
        return None
    return value


def _check_numbers(data: dict[str, Any], report: _Report) -> None:
    for key, kind, example in (
        ("per_device_train_batch_size", int, 2),
        ("gradient_accumulation_steps", int, 1),
        ("cutoff_len", int, 2048),
    ):
        if key in data:
            value = _number(data[key], kind)
            if value is None or value < 1:
                report.problem(key, f"is {data[key]!r}; it must be an integer >= 1, e.g. {key}: {example}")
    if "learning_rate" in data:
        value = _number(data["learning_rate"], float)
        if value is None or value <= 0:
            report.problem("learning_rate", f"is {data['learning_rate']!r}; it must be a number > 0, e.g. 1.0e-4")
    if "val_size" in data:
        value = _number(data["val_size"], float)
        if value is None or value < 0:
            report.problem("val_size", f"is {data['val_size']!r}; use a fraction (0.1) or a record count (100)")
    max_steps = _number(data.get("max_steps", -1), int)
    if max_steps is None:
        report.problem("max_steps", f"is {data['max_steps']!r}; it must be an integer (> 0: stop after that many)")
    elif max_steps <= 0:
        epochs = _number(data.get("num_train_epochs", 3.0), float)
        if epochs is None or epochs <= 0:
            report.problem(
                "num_train_epochs",
                f"is {data.get('num_train_epochs')!r} and max_steps is not set; training would do nothing: "
                "set num_train_epochs > 0 (e.g. 3.0) or max_steps > 0",
            )


def _resolve(base: str, value: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _check_model(data: dict[str, Any], source: str, hub: str, report: _Report) -> ModelRef:
    key = "model_name_or_path"
    name = data.get(key)
    if not isinstance(name, str) or not name.strip():
        report.problem(key, "is not set; set it to a model directory (with config.json) or a hub id")
        return ModelRef(value=str(name), source="controller")
    local = _resolve(report.base, name)
    hub_id = not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))
    if source == "auto":
        source = "controller" if os.path.isdir(local) else "nodes" if os.path.isabs(name) else "hub" if hub_id else ""
    if source == "controller":
        if not os.path.isdir(local):
            report.problem(key, f"directory {local} does not exist on the controller (relative paths are relative to "
                           f"the working directory {report.base}); build or copy the model there, fix the path, or "
                           "give the path the nodes see with train_model_source: nodes")
        elif not os.path.isfile(os.path.join(local, "config.json")):
            report.problem(key, f"directory {local} has no config.json; point it at a saved model directory")
        return ModelRef(value=name, source="controller", path=local)
    if source == "nodes":
        if not os.path.isabs(os.path.expanduser(name)) and not os.path.isdir(local):
            report.problem(key, f"{name!r} is a relative path and the model is to be found on the nodes; give the "
                           "absolute path every node sees (its disk or a shared mount)")
        return ModelRef(value=name, source="nodes", path=local)
    if source == "hub":
        if not hub_id:
            report.problem(key, f"{name!r} is not a hub id (organization/name); fix it or choose another model source")
        revision = data.get("model_revision", "main")
        if not isinstance(revision, str) or not revision.strip():
            report.problem("model_revision", f"is {revision!r}; set a branch, tag or commit of {name}")
        return ModelRef(value=name, source="hub", hub=hub, repo_id=name, revision=str(revision))
    report.problem(key, f"directory {local} does not exist (relative paths are relative to the working directory "
                   f"{report.base}); build or copy the model there, fix the path, or give a hub id (organization/name)")
    return ModelRef(value=name, source="controller", path=local)


def _path_input(data: dict[str, Any], key: str, report: _Report, value: Any = None) -> PathInput | None:
    """A path key read by the run: on the controller (synced), an absolute path on the nodes, or (for
    ``tokenized_path``, written by rank 0 when missing) the run's own."""
    value = data.get(key) if value is None else value
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        report.problem(key, f"is {value!r}; set it to a directory path")
        return None
    local = _resolve(report.base, value)
    if os.path.exists(local):
        return PathInput(key=key, value=value, path=local, source="controller")
    if os.path.isabs(os.path.expanduser(value)):
        return PathInput(key=key, value=value, path=local, source="nodes")
    return PathInput(key=key, value=value, path=local, source="run")


def _check_adapters(data: dict[str, Any], report: _Report) -> tuple[PathInput, ...]:
    """``adapter_name_or_path``: comma-separated adapter directories, each synced from the controller or
    found on the nodes (a hub adapter is not fetched: the nodes train offline)."""
    value = data.get("adapter_name_or_path")
    if value is None:
        return ()
    if not isinstance(value, str) or not value.strip():
        report.problem("adapter_name_or_path", f"is {value!r}; give adapter directories, comma-separated")
        return ()
    adapters = []
    for part in (p.strip() for p in value.split(",")):
        ref = _path_input(data, "adapter_name_or_path", report, value=part)
        if ref and ref.source == "run":
            report.problem("adapter_name_or_path", f"{ref.path} does not exist (relative paths are relative to the "
                           f"working directory {report.base}); download the adapter (hf download) and give its "
                           "directory, or an absolute path the nodes see")
        elif ref:
            adapters.append(ref)
    return tuple(adapters)


def _check_deepspeed(data: dict[str, Any], report: _Report) -> tuple[str | None, int | None]:
    value = data.get("deepspeed")
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        report.problem("deepspeed", f"is {value!r}; set it to the path of a DeepSpeed JSON config file")
        return None, None
    ds_path = _resolve(report.base, value)
    try:
        with open(ds_path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as err:
        report.problem("deepspeed", f"cannot read {ds_path} ({err.strerror}); fix the path (relative paths are "
                       f"relative to the working directory {report.base}, as llamafactory-cli reads them)")
        return None, None
    except json.JSONDecodeError as err:
        report.problem("deepspeed", f"{ds_path} is not valid JSON ({err}); fix the file")
        return None, None
    if not isinstance(config, dict):
        report.problem("deepspeed", f"{ds_path} must hold a JSON object (a DeepSpeed config), "
                       f"not {type(config).__name__}")
        return None, None
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        report.problem("deepspeed", f"{ds_path}: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
        return None, None
    return ds_path, stage


def _names(value: Any) -> list[str] | None:
    """``dataset``/``eval_dataset`` as LLaMA-Factory splits it; None when it is neither string nor list."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",")]
    if isinstance(value, list) and all(isinstance(n, str) for n in value):
        return [n.strip() for n in value]
    return None


@dataclasses.dataclass(frozen=True)
class _DatasetContext:
    """What checking one dataset_info.json entry needs from the yaml."""

    info_path: str
    dataset_dir: str
    stage: str
    max_samples: Any
    hub: str


def _check_datasets(
    data: dict[str, Any], hub: str, report: _Report
) -> tuple[str, str | None, tuple[DatasetRef, ...]]:
    dir_value = data.get("dataset_dir", "data")
    if not isinstance(dir_value, str) or dir_value == "ONLINE" or dir_value.startswith("REMOTE:"):
        report.problem("dataset_dir", f"is {dir_value!r}; the nodes train offline: set it to a local directory "
                       "that holds dataset_info.json")
        return "", None, ()
    dataset_dir = _resolve(report.base, dir_value)
    wanted: list[tuple[str, str]] = []
    for key, split in (("dataset", "train"), ("eval_dataset", "eval")):
        if data.get(key) is None:
            continue
        names = _names(data[key])
        if names is None or not all(names):
            report.problem(key, f"is {data[key]!r}; give dataset names from dataset_info.json, comma-separated "
                           "or as a list")
            continue
        wanted += [(name, split) for name in names]
    if data.get("dataset") is None:
        report.problem("dataset", f"is not set; name the training dataset(s) defined in {dataset_dir}/{DATASET_INFO}")
    if data.get("eval_dataset") is not None and (_number(data.get("val_size"), float) or 0) > 1e-6:
        report.problem("val_size", "cannot be combined with eval_dataset; remove one of them")
    if not wanted:
        return dataset_dir, None, ()

    info_path = os.path.join(dataset_dir, DATASET_INFO)
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError as err:
        report.problem("dataset_dir", f"{info_path} cannot be read ({err.strerror}); dataset_dir (default data, "
                       f"relative to the working directory {report.base}) must hold dataset_info.json")
        return dataset_dir, None, ()
    except json.JSONDecodeError as err:
        report.problems.append(f"{info_path}: not valid JSON ({err}); fix the file")
        return dataset_dir, info_path, ()
    if not isinstance(info, dict):
        report.problems.append(f"{info_path}: must hold a JSON object mapping dataset names to their definitions")
        return dataset_dir, info_path, ()

    refs = []
    for name, split in wanted:
        if name not in info:
            known = ", ".join(sorted(info)) or "none"
            report.problem("dataset" if split == "train" else "eval_dataset",
                           f"dataset {name!r} is not defined in {info_path} (defined: {known}); "
                           "add it there or fix the name")
            continue
        ref = _check_entry(name, split, info[name], _DatasetContext(
            info_path=info_path, dataset_dir=dataset_dir, stage=data.get("stage", "sft"),
            max_samples=data.get("max_samples"), hub=hub), report)
        if ref is not None:
            refs.append(ref)
    return dataset_dir, info_path, tuple(refs)


def _check_entry(name: str, split: str, entry: Any, ctx: _DatasetContext, report: _Report) -> DatasetRef | None:
    where = f"{ctx.info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        report.problems.append(f"{where}: must be a JSON object with at least \"file_name\"")
        return None
    remote = [k for k in REMOTE_KEYS if k in entry]
    if remote:
        return _hub_entry(name, split, entry, ctx, where, report)
    count = len(report.problems)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        report.problem("formatting", f"{formatting!r} is not supported; use one of {', '.join(FORMATS)}", where)
    if (entry.get("ranking", False) is True) != (ctx.stage in RANKING_STAGES):
        need = "true" if ctx.stage in RANKING_STAGES else "false (or leave it out)"
        report.problem("ranking", f"is {json.dumps(entry.get('ranking', False))} but stage {ctx.stage} needs "
                       f"ranking: {need}; use a dataset made for this stage", where)
    for key in ("columns", "tags"):
        if key in entry and not isinstance(entry[key], dict):
            report.problem(key, "must be a JSON object", where)
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        report.problem("file_name", f"is not set; set it to the data file (or directory) in {ctx.dataset_dir}", where)
        return None
    local = os.path.normpath(os.path.join(ctx.dataset_dir, file_name))
    if os.path.isdir(local):
        files = sorted(os.path.join(local, f) for f in os.listdir(local))
    elif os.path.isfile(local):
        files = [local]
    else:
        report.problem("file_name", f"{local} does not exist; put the data file there or fix file_name", where)
        return None
    if not files:
        report.problem("file_name", f"directory {local} is empty; put the data files there", where)
        return None
    exts = {os.path.splitext(f)[1][1:] for f in files}
    if not exts <= FILE_TYPES.keys() or len({FILE_TYPES[e] for e in exts}) > 1:
        report.problem("file_name", f"{local} holds {', '.join(sorted(exts))} files; use files of one type of "
                       f"{', '.join(FILE_TYPES)}", where)
        return None
    if len(report.problems) > count:
        return None
    samples: int | None = 0
    for file in files:
        counted = _check_file(file, entry, formatting, where, report)
        samples = None if counted is None or samples is None else samples + counted
    if samples is not None:
        if isinstance(entry.get("num_samples"), int):
            samples = entry["num_samples"]
        if isinstance(ctx.max_samples, int):  # LLaMA-Factory truncates each dataset to max_samples
            samples = min(samples, ctx.max_samples)
    return DatasetRef(name=name, split=split, entry=entry, path=local, files=tuple(files), samples=samples)


def _hub_entry(name: str, split: str, entry: dict[str, Any], ctx: _DatasetContext, where: str,
               report: _Report) -> DatasetRef | None:
    """A dataset on a hub, chosen as LLaMA-Factory chooses (``ms_hub_url`` under ModelScope or when it is the
    only url, else ``hf_hub_url``); fetched before the run like a hub model."""
    key = "ms_hub_url" if "ms_hub_url" in entry and (ctx.hub == "modelscope" or "hf_hub_url" not in entry) \
        else "hf_hub_url" if "hf_hub_url" in entry else None
    if key is None:
        other = next(k for k in REMOTE_KEYS if k in entry)
        report.problem(other, "is not fetched by llamafleet (the nodes train offline); download the data and "
                       "define the dataset with \"file_name\", or give its hf_hub_url", where)
        return None
    repo_id = entry[key]
    if not isinstance(repo_id, str) or not _HUB_ID.match(repo_id):
        report.problem(key, f"is {repo_id!r}; give a dataset repository id (organization/name)", where)
        return None
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        report.problem("formatting", f"{formatting!r} is not supported; use one of {', '.join(FORMATS)}", where)
    return DatasetRef(name=name, split=split, entry=entry, path=None, files=(), samples=None,
                      hub=HUB_KEYS[key], repo_id=repo_id)


def _check_file(file: str, entry: dict[str, Any], formatting: str, where: str, report: _Report) -> int | None:
    """Check one data file's first records against the entry; return its record count (None if unknown)."""
    ftype = FILE_TYPES[os.path.splitext(file)[1][1:]]
    if ftype in ("arrow", "parquet"):
        report.warn("file_name", f"{file}: {ftype} files are not inspected here; LLaMA-Factory checks their "
                    "columns at training", where)
        return None
    try:
        head, count = _read_records(file, ftype)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
        report.problem("file_name", f"{file} cannot be read as {ftype}: {_one_line(err)}; fix the file", where)
        return None
    if count == 0:
        report.problem("file_name", f"{file} holds no records; add data", where)
        return None
    present: set[str] = set()
    for record in head:
        present |= record.keys()
    columns = entry.get("columns")
    for attr in _COLUMN_ATTRS[formatting]:
        column = columns.get(attr) if isinstance(columns, dict) else _DEFAULT_COLUMNS.get(attr)
        if column and column not in present:
            if isinstance(columns, dict):
                how, fix = f"columns.{attr}", f"set columns.{attr} to one of those, or remove it"
            else:
                how = f"the {formatting} default for {attr}; the entry has no \"columns\""
                fix = "add \"columns\" mapping each part to a key the records have (parts left out are not used)"
            report.problem("columns", f"column {column!r} ({how}) is not in the records of {file} (they have: "
                           f"{', '.join(sorted(present))}); {fix}", where)
    if formatting != "alpaca":
        messages = columns.get("messages") if isinstance(columns, dict) else _DEFAULT_COLUMNS["messages"]
        if messages in present:
            _check_messages(head, messages, entry, file, where, report)
    return count


def _read_records(file: str, ftype: str) -> tuple[list[dict[str, Any]], int]:
    """The first INSPECT_RECORDS records and the record count, the way `datasets` reads the file."""
    with open(file, encoding="utf-8", newline="" if ftype == "csv" else None) as f:
        if ftype == "csv":
            rows = csv.DictReader(f)
            head = [r for _, r in zip(range(INSPECT_RECORDS), rows)]
            return head, len(head) + sum(1 for _ in rows)
        if ftype == "text":  # one record per line, in the column "text"
            return [{"text": ""}], sum(1 for _ in f)
        text = f.read()
    # `datasets` reads a .json/.jsonl file as one JSON array of records, or else as JSON lines.
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"line {number}: {err.msg} (expect a JSON array or one object per line)") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"record {bad} is not a JSON object")
    return records[:INSPECT_RECORDS], len(records)


def _check_messages(
    head: list[dict[str, Any]], column: str, entry: dict[str, Any], file: str, where: str, report: _Report
) -> None:
    """Check that messages use the entry's role/content tag keys and role values (first problem only)."""
    tags = entry.get("tags")
    tag = dict(_DEFAULT_TAGS) if not isinstance(tags, dict) else {k: tags.get(k) for k in _DEFAULT_TAGS}
    for key, example in (("role_tag", "role"), ("content_tag", "content")):
        if not tag[key]:
            report.problem("tags", f"\"tags\" is given without {key}; add it (e.g. \"{key}\": \"{example}\")", where)
            return
    roles = {tag[k] for k in _ROLE_TAGS if tag[k]}
    for index, record in enumerate(head):
        messages = record.get(column)
        if messages is None:
            continue
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            report.problem("columns", f"record {index} of {file}: {column!r} must be a list of message objects", where)
            return
        for message in messages:
            for key in ("role_tag", "content_tag"):
                if tag[key] not in message:
                    report.problem("tags", f"{key} is {tag[key]!r} but record {index} of {file} has messages with "
                                   f"keys {', '.join(sorted(message))}; set \"tags\": {{\"{key}\": ...}} to the "
                                   "right key", where)
                    return
            if message[tag["role_tag"]] not in roles:
                report.problem("tags", f"record {index} of {file} has role {message[tag['role_tag']]!r}, which is "
                               f"none of the role tags ({', '.join(sorted(roles))}); set user_tag/assistant_tag/"
                               "system_tag in \"tags\"", where)
                return


def check_arguments(path: str, keys: Collection[str], template: Any, surface: Mapping[str, Any],
                    where: str) -> list[str]:
    """Problems of a yaml's keys and template against what a node's LLaMA-Factory accepts (``surface``:
    its ``version``, ``args`` and ``templates``, as the node's probe reports them; ``where`` names the
    nodes). LLaMA-Factory refuses an unknown key at start, from every rank; here it is one line, with
    the closest valid name."""
    accepted = set(surface.get("args") or ())
    if not accepted:
        return []
    version = surface.get("version", "?")
    problems = []
    for key in sorted(k for k in keys if k not in accepted):
        close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}? " if close else ""
        problems.append(f"{path}: {key}: not an argument of LLaMA-Factory {version} ({where}); {hint}fix or remove it "
                        "(ALLOW_EXTRA_ARGS=1 in train_env passes it anyway)")
    templates = surface.get("templates")
    if isinstance(template, str) and templates and template not in templates:
        close = difflib.get_close_matches(template, templates, n=1, cutoff=0.6)
        problems.append(f"{path}: template: {template!r} is not a template of LLaMA-Factory {version} ({where})"
                        + (f"; did you mean {close[0]}?" if close else "; check the spelling"))
    return problems


def check_precision(cfg: TrainingConfig, cpu_only: bool) -> list[str]:
    """Precision settings the nodes' transformers or LLaMA-Factory would refuse at start, on this stack."""
    data, problems = cfg.data, []
    on = {k for k in ("fp16", "bf16", "pure_bf16") if data.get(k) is True}
    if "fp16" in on and on & {"bf16", "pure_bf16"}:
        problems.append(f"{cfg.path}: fp16 and bf16: both are true, and transformers allows at most one; keep one")
    if cpu_only and "fp16" in on:
        problems.append(f"{cfg.path}: fp16: fp16 mixed precision needs GPUs and this stack has none (a CPU flavor); "
                        "remove fp16, or use a CUDA flavor")
    if cpu_only and on & {"bf16", "pure_bf16"} and data.get("use_cpu") is not True:
        key = "bf16" if "bf16" in on else "pure_bf16"
        problems.append(f"{cfg.path}: {key}: transformers refuses bf16 without a GPU (this stack has none) unless "
                        "use_cpu is true; remove it, or set use_cpu: true")
    return problems


def plan(cfg: TrainingConfig, cluster: Cluster, cpu_only: bool) -> TrainPlan:
    """Ranks, world size and step counts of ``cfg`` on ``cluster``.

    Steps per epoch follow transformers' Trainer: each rank gets ceil(samples / world) records,
    in ceil(that / per-device batch) batches, and takes one optimizer step per
    ``gradient_accumulation_steps`` batches, rounded up. Those nested ceilings equal
    ceil(samples / effective batch). The sample count is an estimate: LLaMA-Factory drops
    malformed examples (odd message counts, unknown roles), may pack several into one sequence
    (``packing``, the default for stage pt), and ``num_samples`` may repeat records. Unknown
    counts (remote or parquet/arrow data) leave the step figures None unless ``max_steps`` is set.
    """
    data = cfg.data
    world = cluster.world_size(cpu_only)
    batch = data.get("per_device_train_batch_size", 8)  # transformers' defaults
    accumulation = data.get("gradient_accumulation_steps", 1)
    effective = batch * world * accumulation
    samples = cfg.train_samples
    per_epoch = math.ceil(samples / effective) if samples is not None else None
    max_steps = data.get("max_steps", -1)
    if max_steps > 0:
        total = max_steps
    elif per_epoch is not None:
        total = math.ceil(data.get("num_train_epochs", 3.0) * per_epoch)
    else:
        total = None
    return TrainPlan(
        nodes=tuple(
            {"name": n.name, "node_rank": n.node_rank, "train_addr": n.train_addr, "nproc": n.nproc(cpu_only)}
            for n in sorted(cluster.nodes, key=lambda n: n.node_rank)
        ),
        master=cluster.master.name,
        master_addr=cluster.master.train_addr,
        world_size=world,
        per_device_batch=batch,
        gradient_accumulation=accumulation,
        effective_batch=effective,
        train_samples=samples,
        steps_per_epoch=per_epoch,
        total_steps=total,
    )


def _node_file_name(ref: DatasetRef, dataset_dir: str) -> str:
    """Where a dataset's file_name goes under the node's data directory (relative to it).

    A file_name inside dataset_dir keeps its relative path, so dataset_info.json needs no change;
    one outside it (absolute, or with ..) gets its own directory named after the dataset.
    """
    rel = os.path.relpath(ref.path, dataset_dir)
    if rel.startswith(os.pardir):
        return os.path.join("external", re.sub(r"[^A-Za-z0-9_.-]", "_", ref.name), os.path.basename(ref.path))
    return rel


NODE_ADAPTERS_DIR = "adapters"
NODE_TOKENIZED_DIR = "tokenized"


def _adapter_rel(index: int, ref: PathInput) -> str:
    return os.path.join(NODE_ADAPTERS_DIR, f"{index}-{os.path.basename(ref.path.rstrip('/')) or 'adapter'}")


def node_files(cfg: TrainingConfig) -> list[tuple[str, str]]:
    """(absolute source path, path relative to the node's job directory) of every input to copy.

    An entry may be a directory (a model, a dataset directory): copy its content recursively.
    dataset_info.json is not listed: write ``node_dataset_info(cfg)`` to ``data/dataset_info.json``.
    """
    pairs = [(ref.path, os.path.join(NODE_DATA_DIR, _node_file_name(ref, cfg.dataset_dir)))
             for ref in cfg.datasets if ref.path]
    if cfg.deepspeed_path:
        pairs.append((cfg.deepspeed_path, os.path.join(NODE_DEEPSPEED_DIR, os.path.basename(cfg.deepspeed_path))))
    if cfg.model_dir:
        pairs.append((cfg.model_dir, NODE_MODEL_DIR))
    pairs += [(a.path, _adapter_rel(i, a)) for i, a in enumerate(cfg.adapters) if a.source == "controller"]
    if cfg.tokenized and cfg.tokenized.source == "controller":
        pairs.append((cfg.tokenized.path, NODE_TOKENIZED_DIR))
    return list(dict.fromkeys(pairs))


def node_dataset_info(cfg: TrainingConfig, hub_paths: dict[str, str] | None = None) -> dict[str, Any]:
    """The node's dataset_info.json: only the referenced entries, file_name as laid out by node_files, and
    every hub dataset pointed at its fetched copy (``hub_paths``: dataset name -> directory), which
    LLaMA-Factory then loads like a hub repository, offline."""
    info = {}
    for ref in cfg.datasets:
        entry = dict(ref.entry)
        if ref.path:
            entry["file_name"] = _node_file_name(ref, cfg.dataset_dir)
        if ref.hub:
            for key in REMOTE_KEYS:
                entry.pop(key, None)
            entry["hf_hub_url"] = (hub_paths or {})[ref.name]
        info[ref.name] = entry
    return info


def rewrite_for_node(cfg: TrainingConfig, node_job_dir: str, *, run_dir: str, model_path: str | None = None,
                     shared_inputs: bool = False, output_dir: str | None = None) -> dict[str, Any]:
    """The training yaml for a node whose job directory is ``node_job_dir`` (absolute), as a dict.

    Every path becomes absolute, so the node may start training from any working directory: inputs
    from the controller under the job directory (or, with ``shared_inputs``, at their own paths),
    the model at ``model_path`` (default: where its source puts it), ``output_dir`` (default: in the run
    directory; a shared one is given) and a missing ``tokenized_path`` in the run directory. All other keys
    are the user's.
    """
    data = dict(cfg.data)
    synced = not shared_inputs

    def place(rel: str, path: str) -> str:
        return os.path.join(node_job_dir, rel) if synced else path

    data["dataset_dir"] = place(NODE_DATA_DIR, cfg.dataset_dir)
    data["output_dir"] = output_dir or os.path.join(run_dir, NODE_OUTPUT_DIR)
    if cfg.deepspeed_path:
        data["deepspeed"] = place(os.path.join(NODE_DEEPSPEED_DIR, os.path.basename(cfg.deepspeed_path)),
                                  cfg.deepspeed_path)
    if model_path is None:
        model_path = place(NODE_MODEL_DIR, cfg.model.path) if cfg.model.source == "controller" else cfg.model.path
    data["model_name_or_path"] = model_path
    if cfg.adapters:
        data["adapter_name_or_path"] = ",".join(
            place(_adapter_rel(i, a), a.path) if a.source == "controller" else a.path for i, a in enumerate(cfg.adapters))
    if cfg.tokenized:
        t = cfg.tokenized
        data["tokenized_path"] = place(NODE_TOKENIZED_DIR, t.path) if t.source == "controller" else \
            t.path if t.source == "nodes" else os.path.join(run_dir, NODE_TOKENIZED_DIR)
    if shared_inputs:
        data["data_shared_file_system"] = True
    return data
