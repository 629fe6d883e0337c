"""Loader behaviour: augmentation, reproducible order, channels_last, DDP sharding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataSection
from pipeline.data.prepare import prepare
from pipeline.data.prepare_config import PrepareConfig

pytestmark = pytest.mark.ffcv
N_TRAIN = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("loaders") / "syn"
    cfg = PrepareConfig(dataset="synthetic", out=str(out), workers=1)
    cfg.synthetic.train_size, cfg.synthetic.val_size = N_TRAIN, 8
    prepare(cfg, log=lambda s: None)
    return out


@pytest.fixture(autouse=True)
def no_compile():
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def op_names(loader) -> list[str]:
    spec = loader.pipeline_specs["image"]
    return [type(op).__name__ for op in [spec.decoder, *spec.transforms]]


def fingerprints(loader) -> list[list[str]]:
    """Per batch, a hash of each image: identifies samples without trusting labels."""
    return [[hashlib.sha1(img.numpy().tobytes()).hexdigest()[:16] for img in x] for x, _ in loader]


@pytest.mark.timeout(120)
def test_same_seed_same_epochs_new_order_each_epoch(store):
    from pipeline.data.loaders import make_loader

    plain = DataSection(augment=False, loader_workers=1)
    a, _ = make_loader(store, "train", 8, plain, seed=3)
    b, _ = make_loader(store, "train", 8, plain, seed=3)
    epochs_a = [sum(fingerprints(a), []) for _ in range(2)]
    epochs_b = [sum(fingerprints(b), []) for _ in range(2)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1] and sorted(epochs_a[0]) == sorted(epochs_a[1])
    assert len(set(epochs_a[0])) == N_TRAIN and len(a) == N_TRAIN // 8


@pytest.mark.timeout(120)
def test_train_augmentation_translates_and_flips_eval_does_not(store):
    from pipeline.data.loaders import make_loader

    aug = DataSection(augment=True, channels_last=True, loader_workers=1)
    loader, m = make_loader(store, "train", 8, aug, order="sequential")
    plain, _ = make_loader(store, "train", 8, DataSection(augment=False, loader_workers=1),
                           order="sequential")
    x_aug, _ = next(iter(loader))
    x_plain, _ = next(iter(plain))
    assert x_aug.shape == (8, 3, 32, 32) and x_aug.is_contiguous(memory_format=__import__("torch").channels_last)
    assert not np.array_equal(x_aug.numpy(), x_plain.numpy())
    names = op_names(loader)
    assert names[:3] == ["SimpleRGBImageDecoder", "RandomTranslate", "RandomHorizontalFlip"]
    assert names.index("NormalizeImage") < names.index("ToTensor")
    ev, _ = make_loader(store, "val", 4, aug)
    assert op_names(ev)[:2] == ["SimpleRGBImageDecoder", "NormalizeImage"]
    assert len(ev) == 2


def _rank(rank: int, world: int, store: str, port: int, out: str) -> None:
    import json

    import torch.distributed as dist
    from ffcv.pipeline.compiler import Compiler

    from pipeline.data.loaders import make_loader

    Compiler.set_enabled(False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loader, _ = make_loader(store, "train", 5, DataSection(augment=False, loader_workers=1),
                            distributed=True, seed=7, drop_last=False)
    epochs = [sum(fingerprints(loader), []) for _ in range(2)]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "len": len(loader)}))
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_see_every_sample_once_per_epoch(store, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, str(store), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["len"] for r in ranks] == [N_TRAIN // 2 // 5] * 2
    for epoch in range(2):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert len(a) == len(b) == N_TRAIN // 2
        assert not set(a) & set(b) and len(set(a) | set(b)) == N_TRAIN
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]


def test_more_loader_workers_than_cores_run_as_many_as_there_are(store):
    """The imagenet recipe asks for 8 loader workers; numba refuses more threads than cores."""
    import numba

    from pipeline.data.loaders import make_loader

    cores = numba.config.NUMBA_NUM_THREADS
    loader, _ = make_loader(store, "val", 4, DataSection(augment=False, loader_workers=cores + 6))
    assert sum(len(labels) for _, labels in loader) > 0


def test_10crop_pads_small_images_with_the_black_the_training_translation_fills():
    """10-crop TTA of 32x32 stores shifts the image as training's translation does; the
    padding must be what that translation shows the net: black, normalised (not 0, the mean)."""
    import torch
    from ffcv.transforms import RandomTranslate

    from pipeline.data.loaders import TRANSLATE_PADDING
    from pipeline.train.evaluate import pad_as_translated

    assert RandomTranslate(padding=TRANSLATE_PADDING).fill.tolist() == [0, 0, 0]
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]

    def normalise(u8: np.ndarray) -> torch.Tensor:
        x = (u8 - np.asarray(mean) * 255) / (np.asarray(std) * 255)
        return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)

    p = TRANSLATE_PADDING
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    torch.testing.assert_close(pad_as_translated(normalise(images), p, mean, std), normalise(padded))


@pytest.mark.timeout(120)
def test_cpythons_rare_ast_miscount_while_ffcv_generates_code_is_made_again(store, monkeypatch):
    """CPython 3.11's AST constructor can raise a spurious SystemError under threads
    (python/cpython#106905) while FFCV generates a loader's code: the loader is built again,
    and any other SystemError still stops it."""
    import ffcv.loader

    from pipeline.data import loaders

    real, calls = ffcv.loader.Loader, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=162, after=182)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ffcv.loader, "Loader", flaky)
    loader, _ = loaders.make_loader(store, "val", 4, DataSection(augment=False, loader_workers=1))
    assert len(calls) == 2 and sum(len(y) for _, y in loader) == 8

    def broken(*args, **kwargs):
        raise SystemError("something else")

    monkeypatch.setattr(ffcv.loader, "Loader", broken)
    with pytest.raises(SystemError, match="something else"):
        loaders.make_loader(store, "val", 4, DataSection(augment=False, loader_workers=1))
