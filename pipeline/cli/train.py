"""`densenet-pipe train`: resolve recipe + flags + --set into one config, check it, submit it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import config as C, runs
from ..errors import UserError
from ..models import spec
from . import app, output
from .options import Address, Detach, Recipe, Sets, Stage, StopOnInterrupt, complete_models


def default_recipe(model_name: str) -> str:
    """The paper's recipe for the net's family: imagenet for Table 1 nets, cifar otherwise."""
    family = spec.resolve(model_name).family
    return "imagenet" if family == "densenet_imagenet" else "cifar"


# The dataset each named recipe trains on, for the default store (Table 1 nets: imagenet).
RECIPE_DATASETS = {"cifar": "cifar10", "svhn": "svhn", "imagenet": "imagenet", "smoke": "synthetic",
                   "finetune": "imagefolder"}


def default_dataset(model_name: str, recipe: str | None) -> str:
    if recipe == "finetune":
        return "imagefolder"
    if spec.resolve(model_name).family == "densenet_imagenet":
        return "imagenet"
    return RECIPE_DATASETS.get(recipe or default_recipe(model_name), "cifar10")


def default_store(model_name: str, recipe: str | None, local: bool) -> str:
    """The store prepared for the model's dataset under the store root, or the error that
    names both ways to give one."""
    from .. import settings

    dataset = default_dataset(model_name, recipe)
    root = settings.store_root()
    candidate = (root / dataset).absolute()
    if (candidate / "manifest.json").is_file() or (not local and settings.get("store_root").value):
        output.info(f"data: {candidate} (the {dataset} store under the store root; --data picks another)")
        return str(candidate)
    raise UserError(f"no training data: pass --data STORE, or prepare the {dataset} store into "
                    f"{candidate} with `densenet-pipe prepare {dataset}` (the store root is "
                    f"{'the store_root setting' if settings.get('store_root').value else './stores'})")


def given_keys(flags: dict[str, Any], sets: list[str] | None) -> list[str]:
    """The config keys the user gave: flags with a value and --set keys (what a resume checks)."""
    return sorted({k for k, v in flags.items() if v is not None} | {s.split("=", 1)[0].strip() for s in sets or []})


def build_config(recipe: str | None, model_name: str | None, flags: dict[str, Any],
                 sets: list[str] | None, check: bool = True) -> C.Config:
    """Recipe defaults, then W&B's environment (WANDB_MODE, WANDB_PROJECT, ...), then flags
    (only those given), then --set overrides; validated unless `check` is False (a resume:
    the run's own config, with these flags' allowed changes, is what gets validated)."""
    cfg = C.load_recipe(recipe or default_recipe(model_name or "densenet_bc100_k12"))
    cfg = C.apply_overrides(cfg, C.wandb_environment())
    given = {k: v for k, v in flags.items() if v is not None}
    if model_name:
        given["model.name"] = model_name
    cfg = C.apply_overrides(cfg, given)
    cfg = C.apply_overrides(cfg, sets or [])
    return C.validate(cfg) if check else cfg


@app.command("train")
def train(
    model: Annotated[str, typer.Argument(metavar="MODEL", autocompletion=complete_models,
                                         help="Model name; see `densenet-pipe models`.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Store from `prepare`: a folder or a URI (s3://..., gs://...).")] = None,
    stage: Stage = None,
    recipe: Recipe = None,
    nodes: Annotated[Optional[str], typer.Option(metavar="N|MIN-MAX", help="Ray nodes the workers span; MIN-MAX: an elastic run that grows and shrinks with the cluster.")] = None,
    workers_per_node: Annotated[Optional[int], typer.Option(help="Workers per node (default: GPUs per node, else 1).")] = None,
    gpus: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="Train on GPUs.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch, split across workers.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate.")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Override the depth L.")] = None,
    growth_rate: Annotated[Optional[int], typer.Option(help="Override the growth rate k.")] = None,
    bottleneck: Annotated[Optional[bool], typer.Option("--bottleneck/--no-bottleneck")] = None,
    compression: Annotated[Optional[float], typer.Option(help="Transition compression theta.")] = None,
    drop_rate: Annotated[Optional[float], typer.Option(help="Dropout after each conv.")] = None,
    amp: Annotated[Optional[str], typer.Option(help="auto, bf16, fp16 or off.")] = None,
    memory_efficient: Annotated[Optional[bool], typer.Option("--memory-efficient/--no-memory-efficient")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (default: auto, on for long bf16 runs on CPUs with native bf16).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Checkpoints and results: folder or URI.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: model and start time).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run NAME from its latest checkpoint.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing in [0, 1).")] = None,
    mixup: Annotated[Optional[float], typer.Option(help="Mixup alpha (0: off).")] = None,
    cutmix: Annotated[Optional[float], typer.Option(help="CutMix alpha (0: off); with --mixup, half the batches each.")] = None,
    accumulate: Annotated[Optional[int], typer.Option(help="Passes per optimizer step (gradient accumulation).")] = None,
    clip_grad_norm: Annotated[Optional[float], typer.Option(help="Clip the gradients' L2 norm to this.")] = None,
    ema: Annotated[Optional[float], typer.Option(help="Keep a moving average of the weights with this decay (e.g. 0.9998); evaluate, predict and export use it.")] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn", help="BatchNorm statistics over the global batch (GPUs; for small per-GPU batches).")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Fine-tune from these weights: a state-dict file, a checkpoint or run folder, or `torchvision`.")] = None,
    backbone_lr_mult: Annotated[Optional[float], typer.Option(help="Fine-tuning: lr multiplier of every layer but the classifier.")] = None,
    freeze_epochs: Annotated[Optional[int], typer.Option(help="Fine-tuning: epochs in which only the classifier learns.")] = None,
    from_epoch: Annotated[Optional[int], typer.Option(help="With --resume: continue from this epoch's checkpoint; newer ones are set aside in the run folder.")] = None,
    wait_for_nodes: Annotated[Optional[float], typer.Option(help="Seconds to wait for an autoscaling cluster to have --nodes.")] = None,
    wandb: Annotated[Optional[str], typer.Option(help="online, offline or off.")] = None,
    wandb_project: Annotated[Optional[str], typer.Option(help="W&B project.")] = None,
    sets: Sets = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config; submit nothing.")] = False,
    save_config: Annotated[Optional[Path], typer.Option(help="Also write the resolved config here (replaces only a config written before).")] = None,
    address: Address = None,
    detach: Detach = False,
    stop_on_interrupt: StopOnInterrupt = False,
) -> None:
    """Train a DenseNet with Ray Train (DDP, mixed precision) as a Ray job."""
    min_nodes, max_nodes = runs.parse_nodes(nodes) if nodes is not None else (None, None)
    flags = {
        "data.store": data, "data.stage": stage.value if stage else None, "cluster.nodes": max_nodes,
        "cluster.min_nodes": min_nodes, "cluster.workers_per_node": workers_per_node,
        "cluster.use_gpu": gpus, "train.epochs": epochs, "optim.batch_size": batch_size,
        "optim.lr": lr, "model.depth": depth, "model.growth_rate": growth_rate,
        "model.bottleneck": bottleneck, "model.compression": compression,
        "model.drop_rate": drop_rate, "train.amp": amp,
        "model.memory_efficient": memory_efficient, "train.compile": compile,
        "cluster.storage": storage, "cluster.run_name": name, "tracking.wandb": wandb,
        "tracking.project": wandb_project, "cluster.address": address,
        "cluster.wait_for_nodes": wait_for_nodes, "model.init_from": init_from,
        "optim.backbone_lr_mult": backbone_lr_mult, "train.freeze_epochs": freeze_epochs,
        "optim.label_smoothing": label_smoothing, "data.mixup": mixup, "data.cutmix": cutmix,
        "optim.accumulate": accumulate, "optim.clip_grad_norm": clip_grad_norm,
        "train.ema": ema, "train.sync_bn": sync_bn,
    }
    if from_epoch is not None and not resume:
        raise UserError("--from-epoch continues a run: give it with --resume NAME")
    # A net's default recipe is its paper's, from scratch: 90 epochs from lr 0.1 would wash
    # out the weights --init-from loads.
    tuning = recipe is None and init_from is not None and not resume
    recipe = "finetune" if tuning else recipe
    # A resume's flags go on the run's saved config, not the recipe's: `--resume R --nodes 3`
    # is checked against R's batch, not a recipe default R never used.
    cfg = build_config(recipe, model, flags, sets, check=not resume)
    if tuning:
        output.info("recipe: finetune, the default with --init-from (--recipe picks another)")
    if not cfg.data.store and not resume:
        cfg = C.apply_overrides(cfg, {"data.store": default_store(model, recipe, local=address is None)})
    if cfg.model.init_from and address is None:
        from ..models.init import resolve

        cfg = C.apply_overrides(cfg, {"model.init_from": resolve(cfg.model.init_from, cfg.model.name)})
    if resume:
        if name and name != resume:
            raise UserError(f"--resume {resume} and --name {name} disagree: give only --resume")
        # The job trains with the run's saved config; these are the keys the user gave.
        changed = sorted({*given_keys(flags, sets), "model.name"})
        cfg = C.apply_overrides(cfg, {"cluster.run_name": resume, "train.resume": True,
                                      "train.resume_changes": changed,
                                      "train.resume_from_epoch": from_epoch})
    cfg = finalize_paths(cfg, address)
    # The job trains a resumed run with its saved config and places its workers by it: the
    # nodes to start are the run's, not the recipe's. A change a resume may not make is
    # refused here, before submitting.
    placed = cfg
    if cfg.train.resume and address is None:
        placed = runs.resumed(cfg, cfg.cluster.storage)
    # What the job will train with: for a resume seen here, the run's own config and the
    # changes asked for, not the recipe's defaults it never used.
    if save_config:
        check_config_out(save_config)
        placed.save(save_config)
    if dry_run:
        output.result(placed.to_json())
        return
    code = submit_job("train", cfg, address, detach, stop_on_interrupt, placed=placed)
    raise typer.Exit(code)


def check_config_out(path: Path) -> None:
    """--save-config replaces a config written before, never another file."""
    from ..storage import check_out_file

    def is_config(p: Path) -> bool:
        try:
            C.Config.load(p)
        except (UserError, ValueError, TypeError, AttributeError):
            return False
        return True

    check_out_file(path, "--save-config", holds="config", ours=is_config)


def finalize_paths(cfg: C.Config, address: str | None) -> C.Config:
    """Absolute store and storage paths, and a run name, fixed before the job is submitted.

    The job runs in a copy of the project, so relative paths would point into that copy. On
    the embedded cluster the default storage is ./runs; a remote cluster's default is its
    own ~/densenet-pipe/runs, resolved by the job.
    """
    updates: dict[str, Any] = {}
    if not cfg.data.store and not cfg.train.resume and not cfg.sweep.resume:
        raise UserError("no training data: pass --data STORE (a folder made by `densenet-pipe prepare`)")
    if address is None and cfg.data.store:
        from ..data.staging import locate

        # A path is hashed here once (cached); a URI's manifest and sizes are read, no more.
        store = cfg.data.store if "://" in cfg.data.store else str(Path(cfg.data.store).expanduser())
        manifest, _ = locate(store)
        runs.check_classes(cfg.model.num_classes, manifest.num_classes, manifest.path)
        runs.check_resizing(cfg.data.min_res, manifest.family, manifest.path)
        updates["data.store"] = manifest.path
    if cfg.cluster.storage is None and address is None:
        updates["cluster.storage"] = runs.default_storage(local_cluster=True)
    elif cfg.cluster.storage and "://" not in cfg.cluster.storage and address is None:
        folder = Path(cfg.cluster.storage).expanduser().resolve()
        updates["cluster.storage"] = str(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--storage {cfg.cluster.storage} is a file: runs go into a folder, e.g. "
                            f"--storage {Path(cfg.cluster.storage).parent / 'runs'}")
    elif cfg.cluster.storage:
        from .. import storage

        storage.check(cfg.cluster.storage)
    if cfg.cluster.run_name is None:
        updates["cluster.run_name"] = f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = C.apply_overrides(cfg, updates) if updates else cfg
    if address is None and cfg.cluster.storage and not cfg.sweep.name:
        from ..train.trainer import check_run_dir

        check_run_dir(cfg, cfg.train.resume)
    elif address is None and cfg.cluster.storage and "://" not in cfg.cluster.storage:
        # Here, not after a job has started; the job checks again (Tune's own state).
        runs.check_new_or_resumed("sweep", cfg.sweep.name, cfg.cluster.storage, cfg.sweep.resume,
                                  (Path(cfg.cluster.storage) / cfg.sweep.name).exists())
    return cfg


def submit_job(job: str, cfg: C.Config, address: str | None, detach: bool, stop_on_interrupt: bool,
               placed: C.Config | None = None) -> int:
    """Submit `cfg`; the cluster's nodes are sized by `placed` (a resumed run's own config)."""
    from .. import submit

    c = (placed or cfg).cluster
    wpn = c.workers_per_node or 1
    # An elastic run needs MIN nodes to start; the embedded cluster is made with MAX.
    resources = {"nodes": c.min_nodes or c.nodes, "max_nodes": c.nodes, "cpus_per_node": wpn * c.cpus_per_worker,
                 "gpus_per_node": wpn if c.use_gpu else 0}
    return submit.run_job(job, cfg.to_dict(), address=address, detach=detach,
                          stop_on_interrupt=stop_on_interrupt, resources=resources,
                          wait_for_nodes=c.wait_for_nodes)
