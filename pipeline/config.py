"""One typed, sectioned config for a run, from recipe + flags + `--set` overrides.

    >>> cfg = load_recipe("cifar")
    >>> cfg = apply_overrides(cfg, ["optim.lr=0.05", "model.name=densenet40_k12"])
    >>> cfg.optim.lr
    0.05
    >>> Config.from_json(cfg.to_json()) == cfg
    True

Unknown keys, wrong types and impossible values raise ConfigError with the key's dotted
path; `validate` also applies the model family's depth and growth-rate rules. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from . import runs
from .errors import UserError, first_line
from .parsing import BOOL_WORDS, ConfigError, parse_dataclass  # noqa: F401  (re-exported)
from .models import spec as model_spec


@dataclass
class ModelSection:
    name: str = "densenet_bc100_k12"
    depth: int | None = None
    growth_rate: int | None = None
    bottleneck: bool | None = None
    compression: float | None = None
    drop_rate: float | None = None
    # None: taken from the store's manifest when the job starts.
    num_classes: int | None = None
    memory_efficient: bool = False
    # Fine-tuning: starting weights (`pipeline.models.init`): a state-dict file, a
    # checkpoint or run folder, or "torchvision". The classifier is replaced when the
    # class count differs.
    init_from: str | None = None


@dataclass
class DataSection:
    store: str = ""
    # The paper's "+": 4-pixel translation and horizontal flips for CIFAR; RandomResizedCrop
    # and flips for ImageNet. SVHN is trained without it.
    augment: bool = True
    resolution: int | None = None
    eval_resolution: int | None = None
    loader_workers: int = 2
    os_cache: bool = True
    channels_last: bool = True
    # Cap on steps per epoch, for smoke runs; 0 means the whole store.
    max_steps_per_epoch: int = 0
    # Mixup / CutMix on each training batch (Beta(alpha, alpha); 0 is off). With both on, a
    # batch is CutMix with probability mix_switch_prob, else Mixup (`pipeline.train.mix`).
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch_prob: float = 0.5
    # Copy the store to node-local disk before the first step (`pipeline.data.staging`):
    # "auto" stages a store in object storage or on a network filesystem and reads a local
    # one in place; "always" stages every store; "never" reads a path in place.
    stage: Literal["auto", "always", "never"] = "auto"
    # Where each node keeps staged stores ("" = the node's temp folder; /dev/shm works).
    cache_dir: str = ""
    # Least-recently-used stores are removed from the cache above this size.
    cache_max_gb: float = 200.0
    # Progressive resizing, as ffcv-imagenet does it (imagenet-family stores): epochs up to
    # start_ramp train at min_res, epochs from end_ramp at max_res, those between on a linear
    # ramp rounded to res_step pixels. Epochs count from 1, as in the history. 0: off.
    min_res: int = 0
    max_res: int = 0
    start_ramp: int = 0
    end_ramp: int = 0
    res_step: int = 32


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    # Global batch, split evenly across all training workers.
    batch_size: int = 64
    # Linear scaling: lr * batch_size / lr_reference_batch when set.
    lr_reference_batch: int | None = None
    label_smoothing: float = 0.0
    # Fine-tuning: every layer but the classifier learns at lr x this.
    backbone_lr_mult: float = 1.0
    # Forward/backward passes per optimizer step: the global batch (batch_size) is split
    # across workers and these passes, for a batch larger than the workers hold at once.
    accumulate: int = 1
    # Clip the gradients' global L2 norm to this before each step (None: no clipping).
    clip_grad_norm: float | None = None


@dataclass
class ScheduleSection:
    # linear: after the warm-up, straight down to 0 at the end (ffcv-imagenet's "cyclic").
    kind: Literal["step", "cosine", "linear", "constant"] = "step"
    # Where the lr is divided: fractions of training for unit "fraction", epochs for "epoch".
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    milestone_unit: Literal["fraction", "epoch"] = "fraction"
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class TrainSection:
    epochs: int = 300
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # torch.compile the net: auto compiles long bf16 runs on CPUs with native bf16 kernels
    # (`pipeline.train.compiling.decide`).
    compile: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    # Continue the run named cluster.run_name from its latest checkpoint, with its own saved
    # config; resume_changes lists the keys the user gave (see runs.resume_config).
    resume: bool = False
    resume_changes: list[str] = field(default_factory=list)
    # With resume: continue from this epoch's checkpoint; newer ones are set aside, not lost.
    resume_from_epoch: int | None = None
    # Fine-tuning: only the classifier learns for this many epochs (the rest frozen, its
    # BatchNorm statistics too).
    freeze_epochs: int = 0
    # Decay of an exponential moving average of the weights (0: none). With it, every epoch
    # is validated with both, checkpoints hold both, and evaluate/predict/export read the
    # average unless told `--weights raw` (`pipeline.train.ema`).
    ema: float = 0.0
    ema_warmup: bool = True
    # BatchNorm statistics over the global batch instead of each worker's (DDP workers with
    # small batches each): PyTorch's SyncBatchNorm, GPUs only.
    sync_bn: bool = False
    # While this file exists the workers wait at the end of each epoch, after its checkpoint
    # ("": <run folder>/HOLD): to hold a run while its cluster changes.
    hold_file: str = ""
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    log_every_steps: int = 50


@dataclass
class ClusterSection:
    address: str | None = None
    # With min_nodes, an elastic run (`--nodes MIN-MAX`): it starts on min_nodes, grows to
    # `nodes` as nodes join and goes on with fewer (down to min_nodes) when one is lost.
    nodes: int = 1
    min_nodes: int | None = None
    # How often an elastic run looks for room to grow (Ray Train's
    # elastic_resize_monitor_interval_s).
    resize_interval_s: float = 60.0
    # None: the GPUs per node when the job asks for GPUs, else 1.
    workers_per_node: int | None = None
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage: str | None = None
    run_name: str | None = None
    max_failures: int = 2
    wait_for_nodes: float = 0.0


@dataclass
class TrackingSection:
    wandb: Literal["online", "offline", "off"] = "offline"
    project: str = "densenet-pipe"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # The W&B run id: set once when a run (or a sweep's summary) starts, its name and a random
    # suffix, and kept by resumes (tracking.new_run_id says why not the name alone).
    run_id: str | None = None


@dataclass
class SweepSection:
    """What `densenet-pipe sweep` explores; ignored by a single training run."""

    family: Literal["densenet", "densenet_bc"] = "densenet_bc"
    growth_rates: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    # "section.key=dist:args": choice:a,b | grid:a,b | uniform:lo:hi | loguniform:lo:hi | randint:lo:hi
    space: list[str] = field(default_factory=list)
    search: Literal["grid", "random", "optuna"] = "grid"
    samples: int = 1
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    # 0: as many trials at once as the cluster holds.
    max_concurrent: int = 0
    name: str | None = None
    # A resumed sweep goes on with its saved sweep.json; resume_changes lists the keys the
    # user gave (see runs.resumed_sweep).
    resume: bool = False
    resume_changes: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return parse_dataclass(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e.msg} at line {e.lineno}): "
                              "pass the file that `densenet-pipe` wrote") from None
        return cls.from_dict(data)

    def digest(self) -> str:
        """A short stable hash of the resolved config, for job metadata and run names."""
        return digest(self.to_dict())

    def save(self, path: str | Path) -> str | Path:
        """Write the resolved config as JSON atomically, to a path or a storage URI."""
        from . import storage

        storage.write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Config":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        return cls.from_json(text)

    def model_spec(self) -> model_spec.DenseNetSpec:
        m = self.model
        try:
            spec = model_spec.resolve(
                m.name, depth=m.depth, growth_rate=m.growth_rate, bottleneck=m.bottleneck,
                compression=m.compression, drop_rate=m.drop_rate, num_classes=m.num_classes,
                input_size=self.data.resolution,
            )
        except model_spec.SpecError as e:
            raise ConfigError(f"model: {e}") from None
        if m.drop_rate is None and not self.data.augment and spec.stem == "cifar":
            # The paper's rule for CIFAR and SVHN nets trained without augmentation.
            spec = dataclasses.replace(spec, drop_rate=0.2)
        return spec

    def epochs_milestones(self) -> list[float]:
        """LR milestones in epochs, whatever unit the recipe wrote them in."""
        s = self.schedule
        if s.milestone_unit == "fraction":
            return [m * self.train.epochs for m in s.milestones]
        return list(s.milestones)


_SECTIONS = {f.name: f.type for f in fields(Config)}


def digest(data: dict[str, Any]) -> str:
    """The one config digest: a short hash of a config dict (a Config's, or a job's)."""
    return hashlib.sha256(json.dumps(data, indent=2, sort_keys=True).encode()).hexdigest()[:12]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` with YAML scalars: `optim.lr=0.05`, `tracking.tags=[a,b]`."""
    import yaml  # lazy: only --set and recipes need it, and every command imports this module

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE: write e.g. optim.lr=0.05")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. optim.lr")
    if raw.strip().lower() in BOOL_WORDS and raw.strip().lower() not in ("true", "false"):
        # Left as a word: a bool field takes it as a bool, a choice field as its name.
        return path, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Apply `section.key=value` strings (or a {dotted: value} dict) and re-check every type."""
    data = cfg.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else [
        (".".join(p), v) for p, v in map(parse_override, overrides)]
    for dotted, value in items:
        section, key = dotted.split(".", 1) if "." in dotted else (dotted, "")
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {dotted}: sections are "
                              f"{', '.join(_SECTIONS)}")
        if key not in data[section]:
            raise ConfigError(f"unknown key {dotted}: {section} takes "
                              f"{', '.join(sorted(data[section]))}")
        data[section][key] = value
    return Config.from_dict(data)


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("pipeline.recipes").iterdir()
                  if p.name.endswith(".yaml"))


# W&B's own environment variables, as wandb.init reads them; WANDB_MODE's old words too.
WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
               "disabled": "off"}


def wandb_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The tracking keys W&B's environment sets (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY,
    WANDB_RUN_GROUP): they sit over the recipe and under flags and --set."""
    import os

    env = os.environ if environ is None else environ
    out = {}
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode:
        if mode not in WANDB_MODES:
            raise UserError(f"WANDB_MODE={env['WANDB_MODE']!r} is not a W&B mode: set it to online, "
                            "offline or disabled, or unset it")
        out["tracking.wandb"] = WANDB_MODES[mode]
    for var, key in (("WANDB_PROJECT", "tracking.project"), ("WANDB_ENTITY", "tracking.entity"),
                     ("WANDB_RUN_GROUP", "tracking.group")):
        if env.get(var, "").strip():
            out[key] = env[var].strip()
    return out


def load_recipe(name_or_path: str) -> Config:
    """A recipe by name (`cifar`, `svhn`, `imagenet`, `smoke`) or a YAML file path."""
    import yaml

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    else:
        res = resources.files("pipeline.recipes").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; recipes: "
                              f"{', '.join(recipe_names())} (or a path to a .yaml file)")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {name_or_path} is not valid YAML{where} "
                          f"({getattr(e, 'problem', None) or first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name_or_path} is not a recipe: a recipe is a YAML mapping of config "
                          "sections (model:, optim:, train:, ...), as in `train --dry-run`'s output")
    return Config.from_dict(data)


def validate(cfg: Config) -> Config:
    """Every rule a config must pass before it is submitted; returns it unchanged."""
    cfg.model_spec()
    o, s, t, d, c = cfg.optim, cfg.schedule, cfg.train, cfg.data, cfg.cluster
    checks = [
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}"),
        (o.lr_reference_batch is None or o.lr_reference_batch >= 1,
         "optim.lr_reference_batch must be >= 1 when set"),
        (0 <= o.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {o.label_smoothing}"),
        (not (o.nesterov and o.name == "sgd" and o.momentum == 0),
         "optim.nesterov needs optim.momentum > 0"),
        (0 < s.gamma <= 1, f"schedule.gamma must be in (0, 1], got {s.gamma}"),
        (s.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
        (s.warmup_epochs <= t.epochs, "schedule.warmup_epochs must not exceed train.epochs"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (o.backbone_lr_mult >= 0, f"optim.backbone_lr_mult must be >= 0, got {o.backbone_lr_mult}"),
        (o.accumulate >= 1, f"optim.accumulate must be >= 1, got {o.accumulate}"),
        (o.clip_grad_norm is None or o.clip_grad_norm > 0,
         f"optim.clip_grad_norm must be > 0 (or unset), got {o.clip_grad_norm}"),
        (cfg.data.mixup >= 0 and cfg.data.cutmix >= 0, "data.mixup and data.cutmix must be >= 0"),
        (0 <= cfg.data.mix_switch_prob <= 1, "data.mix_switch_prob must be in [0, 1]"),
        (t.freeze_epochs >= 0, f"train.freeze_epochs must be >= 0, got {t.freeze_epochs}"),
        (t.freeze_epochs < t.epochs,
         f"train.freeze_epochs ({t.freeze_epochs}) must be fewer than train.epochs ({t.epochs}), "
         f"or nothing but the classifier would learn: pass --freeze-epochs {t.epochs - 1} "
         f"or --epochs {t.freeze_epochs + 1}"),
        (t.resume_from_epoch is None or t.resume,
         "--from-epoch continues a run: give it with --resume NAME"),
        (t.resume_from_epoch is None or 1 <= t.resume_from_epoch < t.epochs,
         f"--from-epoch must be in [1, {t.epochs}) (the run's train.epochs), got {t.resume_from_epoch}"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (0 <= t.ema < 1, f"train.ema is a decay in [0, 1) (e.g. 0.9998; 0 is off), got {t.ema}"),
        (t.log_every_steps >= 1, "train.log_every_steps must be >= 1"),
        (d.loader_workers >= 1, "data.loader_workers must be >= 1"),
        (d.max_steps_per_epoch >= 0, "data.max_steps_per_epoch must be >= 0"),
        (d.resolution is None or d.resolution >= 8, "data.resolution must be >= 8 pixels"),
        (d.cache_max_gb > 0, f"data.cache_max_gb must be > 0, got {d.cache_max_gb}"),
        (bool(d.min_res) == bool(d.max_res),
         "progressive resizing needs both data.min_res and data.max_res (or neither)"),
        (not d.min_res or 8 <= d.min_res <= d.max_res,
         f"data.min_res must be in [8, data.max_res], got {d.min_res} and {d.max_res}"),
        (not d.min_res or 0 <= d.start_ramp <= d.end_ramp,
         f"data.start_ramp ({d.start_ramp}) must be >= 0 and <= data.end_ramp ({d.end_ramp})"),
        (d.res_step >= 1, "data.res_step must be >= 1 pixel"),
        (not (d.stage == "never" and "://" in d.store),
         f"--stage never reads a store in place, and {d.store.split('?')[0]} is in object storage: "
         "use --stage auto"),
        (c.nodes >= 1, f"cluster.nodes must be >= 1, got {c.nodes}"),
        (c.min_nodes is None or 1 <= c.min_nodes <= c.nodes,
         f"cluster.min_nodes must be in [1, cluster.nodes={c.nodes}], got {c.min_nodes}: --nodes MIN-MAX"),
        (c.resize_interval_s > 0, f"cluster.resize_interval_s must be > 0, got {c.resize_interval_s}"),
        (c.workers_per_node is None or c.workers_per_node >= 1, "cluster.workers_per_node must be >= 1"),
        (c.cpus_per_worker > 0, "cluster.cpus_per_worker must be > 0"),
        (c.max_failures >= 0, "cluster.max_failures must be >= 0"),
        (c.wait_for_nodes >= 0, "cluster.wait_for_nodes must be >= 0"),
        (not (t.amp == "fp16" and not c.use_gpu), "train.amp=fp16 needs GPUs: use bf16 or off on CPUs"),
        (not (t.sync_bn and not c.use_gpu),
         "train.sync_bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): drop --sync-bn on CPUs"),
    ]
    if s.kind == "step":
        # Only the step schedule reads milestones: a cosine run of 3 epochs keeps the recipe's.
        if s.milestone_unit == "fraction":
            checks.append((all(0 < m < 1 for m in s.milestones),
                           "schedule.milestones must be fractions in (0, 1) with milestone_unit=fraction"))
        else:
            checks.append((all(0 < m <= t.epochs for m in s.milestones),
                           f"schedule.milestones {s.milestones} must be epochs in (0, {t.epochs}]: set "
                           "schedule.milestones or use schedule.milestone_unit=fraction"))
        checks.append((list(s.milestones) == sorted(s.milestones), "schedule.milestones must increase"))
    checks.append((not (cfg.sweep.name and c.min_nodes is not None),
                   "a sweep's trials each hold a fixed number of nodes: give sweep --nodes N, not MIN-MAX"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        # The final split is checked again in the job, once it knows the GPUs per node.
        runs.per_worker_batch(o.batch_size, c.nodes, c.workers_per_node or 1, o.accumulate)
        if c.run_name is not None:
            runs.check_name("run", c.run_name)
        if cfg.sweep.name is not None:
            runs.check_name("sweep", cfg.sweep.name)
    except UserError as e:
        raise ConfigError(str(e)) from None
    return cfg
