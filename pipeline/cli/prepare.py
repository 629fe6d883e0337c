"""`densenet-pipe prepare`: check the flags, then submit the `prepare` job to Ray."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..data.prepare_config import DATASETS, PrepareConfig, validate_prepare
from ..data.publish import check_out, check_remote_out
from ..storage import is_uri
from .. import settings
from ..errors import UserError
from . import app, output
from .options import Address, Detach, StopOnInterrupt, complete_datasets


def build_prepare_config(dataset: str, flags: dict[str, Any], synthetic: dict[str, Any],
                         *, local: bool) -> PrepareConfig:
    """Flags (only those given) into a validated PrepareConfig.

    With a local cluster the job sees this machine's files: paths become absolute (the job
    runs in a copy of the working directory), and they and the source's layout are checked
    here, before submitting.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    data: dict[str, Any] = {"dataset": dataset}
    data.update({k: v for k, v in flags.items() if v is not None})
    if dataset != "synthetic" and not data.get("source"):
        data["source"], where = settings.source_for(dataset)
        output.info(f"source: {data['source']} (sources.{dataset} from {where})")
    data.setdefault("out", str(settings.store_root() / dataset))
    data["synthetic"] = {k: v for k, v in synthetic.items() if v is not None}
    cfg = validate_prepare(PrepareConfig.from_dict(data))
    if is_uri(cfg.out):
        check_remote_out(cfg.out, cfg.force)
    if local:
        if cfg.source:
            from ..data.readers import check_layout

            cfg.source = str(Path(cfg.source).expanduser().absolute())
            check_layout(cfg)  # here, not after a job has started
        if not is_uri(cfg.out):
            out = Path(cfg.out).expanduser().absolute()
            cfg.out = str(out)
            check_out(out, cfg.force)
            parent = next((p for p in out.parents if p.exists()), None)
            if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"cannot write to {parent} (permission denied): choose an --out you can write to")
    return cfg


def prepare_memory(workers: int) -> int:
    """Bytes a 1-node prepare's driver asks Ray for: its own reader and checks, plus per
    writer process a page buffer (up to FFCV's 256 MiB cap) and the image in hand."""
    return (1 << 30) + workers * (512 << 20)


def _one_source(dataset: str, positional: str | None, option: str | None) -> str | None:
    """`prepare imagefolder PATH` is what people type first: the same as --source PATH."""
    if positional is None:
        return option
    if dataset == "synthetic":
        raise UserError(f"synthetic makes its images and takes no source, not {positional!r}: "
                        "drop it, or choose the dataset it is")
    if option is not None and option != positional:
        raise UserError(f"two sources, {positional!r} and --source {option!r}: give one")
    return positional


class Family(str, Enum):
    small = "small"
    imagenet = "imagenet"


@app.command("prepare")
def prepare(
    dataset: Annotated[str, typer.Argument(metavar="DATASET", autocompletion=complete_datasets, help=f"One of: {', '.join(DATASETS)}.")],
    source_arg: Annotated[Optional[str], typer.Argument(metavar="[SOURCE]", show_default=False, help="The same as --source.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Official archive/.mat/folder (see datasets/README.md); default: the sources.DATASET setting.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Store to write: a folder or a URI such as s3://bucket/stores/NAME (default: STORE_ROOT/DATASET; see `config show`).")] = None,
    max_resolution: Annotated[Optional[int], typer.Option(help="Longest side in pixels; larger images are downscaled.")] = None,
    write_mode: Annotated[Optional[str], typer.Option(help="raw, jpg, smart or proportion (default: the dataset card's).")] = None,
    jpeg_quality: Annotated[Optional[int], typer.Option(help="JPEG quality 1-100 for jpg/smart/proportion.")] = None,
    compress_probability: Annotated[Optional[float], typer.Option(help="Share of images stored as JPEG in proportion mode.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Writer processes (with --nodes 1).")] = None,
    nodes: Annotated[Optional[int], typer.Option(help="Write on N nodes, a contiguous shard each with all its CPUs, merged into one store in the same order.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="imagefolder without val/: hold out this share of each class as val (by a hash of each image's path; e.g. 0.1).")] = None,
    skip_bad: Annotated[Optional[bool], typer.Option("--skip-bad", help="Leave unreadable images out (listed in the manifest) instead of stopping.")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Replace an existing store.")] = None,
    extra: Annotated[Optional[bool], typer.Option("--extra/--no-extra", help="SVHN: add extra_32x32.mat to train (default: when present).")] = None,
    size: Annotated[Optional[int], typer.Option(help="synthetic: train images.")] = None,
    val_size: Annotated[Optional[int], typer.Option(help="synthetic: val images.")] = None,
    classes: Annotated[Optional[int], typer.Option(help="synthetic: number of classes.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Train/eval resolution of the store (default: the card's, capped at the largest image); synthetic: the image side.")] = None,
    family: Annotated[Optional[Family], typer.Option(help="Loader family: small (native size, translate+flip) or imagenet (RandomResizedCrop); default: the card's, or for imagefolder from the images' median size.")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="synthetic: varied sizes from this up to --resolution.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="synthetic: seed.")] = None,
    noise: Annotated[Optional[float], typer.Option(help="synthetic: pixel noise (std); more is harder to learn.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved job config; submit nothing.")] = False,
    address: Address = None,
    detach: Detach = False,
    stop_on_interrupt: StopOnInterrupt = False,
) -> None:
    """Write an FFCV store (train.beton, val.beton, manifest.json) from a dataset, as a Ray job."""
    source = _one_source(dataset, source_arg, source)
    cfg = build_prepare_config(dataset, {
        "source": source, "out": out, "max_resolution": max_resolution, "write_mode": write_mode,
        "jpeg_quality": jpeg_quality, "compress_probability": compress_probability,
        "workers": workers, "nodes": nodes, "skip_bad": skip_bad, "force": force, "extra": extra,
        "val_fraction": val_fraction,
        "family": family.value if family else None,
        "resolution": resolution if dataset != "synthetic" else None,
    }, {"train_size": size, "val_size": val_size, "num_classes": classes,
        "resolution": resolution if dataset == "synthetic" else None, "min_size": min_size,
        "seed": seed, "noise": noise},
        local=address is None)
    if dry_run:
        output.as_json(cfg.to_dict())
        return
    from .. import submit

    # With one node the driver writes with its own processes: it holds their CPUs, on a node
    # that has them (a cluster's head often has none for work). With more, shard tasks hold
    # the nodes' CPUs and the driver only merges: it holds none, or it would keep a shard
    # from its node.
    driver = {"num_cpus": cfg.workers, "memory": prepare_memory(cfg.workers)} if cfg.nodes == 1 else None
    code = submit.run_job("prepare", cfg.to_dict(), address=address, detach=detach,
                          stop_on_interrupt=stop_on_interrupt, driver=driver)
    if code:
        raise typer.Exit(code=code)
    if not detach and (address is None or is_uri(cfg.out) or Path(cfg.out).is_absolute()):
        output.result(cfg.out)  # a relative one names a place on the cluster: its job said where
