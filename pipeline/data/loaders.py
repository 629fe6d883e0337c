"""FFCV loaders over a store, for training and evaluation (CPU tensors).

    loader, manifest = make_loader("stores/cifar10", "train", 64, cfg.data,
                                   distributed=True, seed=cfg.train.seed)
    for images, labels in loader:      # float32 N x 3 x H x W normalised, int64 N
        ...

- Call it inside each Ray Train worker after `torch.distributed` is initialised when
  `distributed=True`: each rank then reads its own shard (FFCV pads the last shard by
  repeating samples, like DistributedSampler, when the split does not divide evenly).
- Train order is random and reshuffled every epoch from `seed + epoch`, so the same seed gives
  the same sequence of epochs; set `loader.next_epoch = e` before iterating to resume at
  epoch e. Val order is sequential.
- Batches live in buffers the loader reuses: `.clone()` anything kept past the next batch.
- `len(loader)` is the number of batches per epoch (per rank).
- Pipelines: "small" stores (CIFAR, SVHN, 32x32 synthetic) train with 4-pixel translation +
  horizontal flip (translation only for SVHN) when `data_cfg.augment`; "imagenet" stores with
  RandomResizedCrop + flip; evaluation takes a centre crop (224/256 of the shorter side for
  imagenet stores). Numba steps run before the torch steps (a numba step after a torch step
  makes FFCV's Loader loop forever).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np

from ..config import DataSection
from ..errors import UserError
from .store import Manifest, open_store

EVAL_CROP_RATIO = 224 / 256
TRANSLATE_PADDING = 4


def image_pipeline(manifest: Manifest, training: bool, data_cfg: DataSection, *,
                   channels_last: bool, crop_ratio: float | None = None) -> list[Any]:
    """FFCV ops from stored bytes to a normalised float32 NCHW tensor: the training pipeline
    (train resolution, the store's augmentation) or the evaluation one (eval resolution,
    centre crop), whichever split the bytes come from.

    `crop_ratio` replaces the 224/256 centre crop of imagenet stores at evaluation (1.0 keeps
    the whole centre square, for 10-crop testing).
    """
    from ffcv.fields.decoders import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                      SimpleRGBImageDecoder)
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, RandomTranslate, ToTensor, ToTorchImage

    res = (data_cfg.resolution or manifest.resolution) if training else (
        data_cfg.eval_resolution or data_cfg.resolution or manifest.eval_resolution)
    augment = manifest.augment if (training and data_cfg.augment) else "none"
    ops: list[Any]
    if manifest.family == "small":
        if manifest.fixed_size == [res, res]:
            ops = [SimpleRGBImageDecoder()]
        else:
            ops = [CenterCropRGBImageDecoder((res, res), ratio=1.0)]
        if augment in ("translate_flip", "translate"):
            ops.append(RandomTranslate(padding=TRANSLATE_PADDING))
        if augment in ("translate_flip", "rrc_flip"):
            ops.append(RandomHorizontalFlip())
    elif augment == "rrc_flip":
        ops = [RandomResizedCropRGBImageDecoder((res, res)), RandomHorizontalFlip()]
    else:
        ops = [CenterCropRGBImageDecoder((res, res), ratio=crop_ratio or EVAL_CROP_RATIO)]
    mean = np.asarray(manifest.mean, dtype=np.float64) * 255
    std = np.asarray(manifest.std, dtype=np.float64) * 255
    return ops + [NormalizeImage(mean, std, np.float32), ToTensor(),
                  ToTorchImage(channels_last=channels_last)]


def ramp_resolution(data_cfg: DataSection, epoch: int) -> int | None:
    """The train resolution of epoch `epoch` (from 1) under progressive resizing, or None
    when it is off: min_res up to start_ramp, max_res from end_ramp, a linear ramp between
    rounded to the nearest multiple of res_step (and kept within [min_res, max_res])."""
    d = data_cfg
    if not d.min_res:
        return None
    if epoch <= d.start_ramp:
        return d.min_res
    if epoch >= d.end_ramp:
        return d.max_res
    t = (epoch - d.start_ramp) / (d.end_ramp - d.start_ramp)
    res = int(round((d.min_res + t * (d.max_res - d.min_res)) / d.res_step)) * d.res_step
    return min(max(res, d.min_res), d.max_res)


def set_train_resolution(loader: Any, res: int) -> None:
    """Have a train loader's decoder crop to res x res from its next epoch on. FFCV sizes its
    buffers from the decoder at the start of every epoch, so nothing is rebuilt."""
    decoder = loader.pipeline_specs["image"].decoder
    if not hasattr(decoder, "output_size"):
        raise UserError("progressive resizing needs a store whose images are cropped to size "
                        "(the imagenet family); this store's images are read at their stored size")
    decoder.output_size = (res, res)


def label_pipeline() -> list[Any]:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


# "0" decodes without numba-compiling the pipeline: the same images, without the ~10-20 s a
# new process spends compiling (the test suite's Ray workers use it; training should not).
JIT_ENV = "DENSENET_PIPE_FFCV_JIT"


def decode_threads(asked: int) -> int:
    """FFCV decodes on numba threads, and numba refuses more than this machine's cores
    (`NUMBA_NUM_THREADS`): a recipe's 8 loader workers run as 2 on a 2-core node."""
    import numba

    return max(1, min(asked, numba.config.NUMBA_NUM_THREADS))


def make_loader(store_dir: str | os.PathLike, split: Literal["train", "val"], batch_size: int,
                data_cfg: DataSection, *, distributed: bool = False, seed: int = 0,
                drop_last: bool | None = None, channels_last: bool | None = None,
                order: Literal["random", "sequential", "quasi_random"] | None = None,
                indices: Any = None, verify: bool = True,
                crop_ratio: float | None = None, training: bool | None = None) -> tuple[Any, Manifest]:
    """An FFCV Loader over `split` of the store, and the store's Manifest.

    `training` (default: split is train) reads for training: the training pipeline, random
    order, drop_last; otherwise as for evaluation: the eval pipeline, in order, every sample
    (predicting the train split reads it so). batch_size is per worker; channels_last
    defaults to `data_cfg.channels_last`. `indices` selects a subset (e.g. for smoke runs);
    `verify` checks the sha256s (cached).
    """
    from ffcv.loader import Loader, OrderOption

    if os.environ.get(JIT_ENV) == "0":
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_enabled(False)
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    manifest = open_store(store_dir, verify=verify)
    train = split == "train" if training is None else training
    order = order or ("random" if train else "sequential")
    if distributed and order == "quasi_random":
        raise UserError("order quasi_random does not work with distributed=True: use random")
    if channels_last is None:
        channels_last = data_cfg.channels_last
    def build() -> Loader:
        return Loader(
            str(manifest.beton(split)),
            batch_size=batch_size,
            num_workers=decode_threads(data_cfg.loader_workers),
            os_cache=data_cfg.os_cache,
            order={"random": OrderOption.RANDOM, "sequential": OrderOption.SEQUENTIAL,
                   "quasi_random": OrderOption.QUASI_RANDOM}[order],
            distributed=distributed,
            seed=seed,
            indices=indices,
            drop_last=train if drop_last is None else drop_last,
            pipelines={"image": image_pipeline(manifest, train, data_cfg, channels_last=channels_last,
                                               crop_ratio=crop_ratio),
                       "label": label_pipeline()},
        )

    try:
        loader = build()
    except SystemError as e:
        # FFCV generates its pipeline's code with `ast.parse`, and CPython 3.11's AST
        # constructor rarely miscounts its recursion depth in a process with other threads
        # running (python/cpython#106905): the same parse succeeds when made again.
        if "AST constructor recursion depth mismatch" not in str(e):
            raise
        loader = build()
    return loader, manifest
