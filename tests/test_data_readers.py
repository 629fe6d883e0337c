"""Readers of the official formats, cards, configs and the prepare CLI's checks (no FFCV)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fixtures_data import WNIDS, jpeg_bytes, make_cifar, make_ilsvrc, make_imagefolder, make_svhn
from pipeline.cli import app
from pipeline.config import ConfigError
from pipeline.data.cards import card_names, load_card
from pipeline.data.prepare_config import DATASETS, PrepareConfig, validate_prepare
from pipeline.data.readers import decode_image, read_source, synthetic_image
from pipeline.errors import UserError


def cfg(dataset, source, **kw):
    return PrepareConfig(dataset=dataset, source=str(source), out="unused", **kw)


def test_every_dataset_has_a_valid_card():
    assert set(card_names()) == set(DATASETS)
    for name in DATASETS:
        card = load_card(name)
        assert len(card.mean) == len(card.std) == 3
        assert card.family in ("small", "imagenet")


@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_tarball_and_folder(tmp_path, extracted):
    path, exp = make_cifar(tmp_path, 10, extracted=extracted)
    src = read_source(cfg("cifar10", path))
    assert np.array_equal(src.splits["train"].images, exp["train_x"])
    assert np.array_equal(src.splits["train"].labels, exp["train_y"])
    assert np.array_equal(src.splits["val"].images, exp["val_x"])
    assert np.array_equal(src.splits["val"].labels, exp["val_y"])
    assert src.classes == exp["classes"]
    assert src.files == ([] if extracted else [path])
    assert "train has 20 images, the card says 50000" in src.notes


def test_cifar100_fine_labels_and_coarse_in_info(tmp_path):
    path, exp = make_cifar(tmp_path, 100)
    src = read_source(cfg("cifar100", path))
    assert np.array_equal(src.splits["train"].labels, exp["train_y"])
    assert len(src.classes) == 100 and len(src.info["coarse_classes"]) == 20
    for fine, coarse in zip(exp["train_y"], exp["coarse_y"]):
        assert src.info["fine_to_coarse"][fine] == coarse


def test_cifar_bad_inputs_name_the_file(tmp_path):
    path, _ = make_cifar(tmp_path / "ok", 10)
    truncated = tmp_path / "cifar-10-python.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{truncated}.*truncated"):
        read_source(cfg("cifar10", truncated))
    other, _ = make_cifar(tmp_path / "c100", 100)
    with pytest.raises(UserError, match="has no cifar-10-batches-py/data_batch_1.*cifar-100-python"):
        read_source(cfg("cifar10", other))
    with pytest.raises(UserError, match="does not exist"):
        read_source(cfg("cifar10", tmp_path / "missing.tar.gz"))


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / n).write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="not a CIFAR pickle.*builtins.print"):
        read_source(cfg("cifar10", folder))


def test_svhn_label_10_is_zero_and_extra_is_optional(tmp_path):
    exp = make_svhn(tmp_path, n_train=6, n_test=4, n_extra=3)
    src = read_source(cfg("svhn", tmp_path, extra=False))
    assert np.array_equal(src.splits["train"].images, exp["train"][0])
    assert np.array_equal(src.splits["train"].labels, exp["train"][1])
    assert src.splits["train"].labels[0] == 0
    both = read_source(cfg("svhn", tmp_path / "train_32x32.mat"))
    assert len(both.splits["train"]) == 9 and both.info["extra"] is True
    assert np.array_equal(both.splits["train"].images[6:], exp["extra"][0])
    assert np.array_equal(both.splits["val"].labels, exp["test"][1])


def test_svhn_bad_inputs(tmp_path):
    from scipy.io import savemat

    make_svhn(tmp_path, n_train=4, n_test=2)
    with pytest.raises(UserError, match="extra_32x32.mat is missing"):
        read_source(cfg("svhn", tmp_path, extra=True))
    savemat(tmp_path / "train_32x32.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(UserError, match=r"train_32x32.mat has no 'X' and 'y' array"):
        read_source(cfg("svhn", tmp_path))
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(UserError, match="train_32x32.mat is not a readable .mat file"):
        read_source(cfg("svhn", tmp_path))
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(UserError, match="test_32x32.mat is missing"):
        read_source(cfg("svhn", tmp_path))


@pytest.mark.parametrize("train,val", [("folders", "devkit"), ("tar", "loc"), ("folders", "sorted")])
def test_imagenet_layouts(tmp_path, train, val):
    exp = make_ilsvrc(tmp_path, train=train, val=val)
    src = read_source(cfg("imagenet", tmp_path))
    assert src.info["synsets"] == sorted(WNIDS)
    if val != "sorted":
        assert src.classes[0] == "tench, Tinca tinca"
    assert len(src.splits["train"]) == exp["train_count"]
    assert np.array_equal(src.splits["train"].labels, np.repeat(np.arange(3), 3))
    assert np.array_equal(src.splits["val"].labels, exp["val_y"])
    assert "3 classes found, the card says 1000" in src.notes


def test_imagenet_messy_images_decode_and_truncated_is_reported(tmp_path):
    exp = make_ilsvrc(tmp_path, train="tar", val="loc")
    src = read_source(cfg("imagenet", tmp_path))
    split = src.splits["train"]
    split.bad_dir = tmp_path / "bad"
    split.bad_dir.mkdir()
    for i in range(len(split)):
        image, _ = split[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    bad = [p.read_text() for p in split.bad_dir.iterdir()]
    assert len(bad) == 1 and exp["truncated"] in bad[0] and "ILSVRC2012_img_train.tar:" in bad[0]


def test_imagenet_bad_inputs(tmp_path):
    make_ilsvrc(tmp_path / "nogt", val="none", messy=False)
    with pytest.raises(UserError, match="flat.*no ground truth.*ILSVRC2012_devkit_t12.tar.gz"):
        read_source(cfg("imagenet", tmp_path / "nogt"))
    make_ilsvrc(tmp_path / "missing", val="devkit", messy=False)
    import shutil
    shutil.rmtree(tmp_path / "missing" / "train" / WNIDS[2])
    with pytest.raises(UserError, match=f"missing classes.*{WNIDS[2]}"):
        read_source(cfg("imagenet", tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no ImageNet train data.*ILSVRC2012_img_train.tar"):
        read_source(cfg("imagenet", tmp_path / "empty"))
    make_ilsvrc(tmp_path / "trunc", train="tar", val="sorted", messy=False)
    tar = tmp_path / "trunc" / "ILSVRC2012_img_train.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(UserError, match="ILSVRC2012_img_train.tar is truncated"):
        read_source(cfg("imagenet", tmp_path / "trunc"))


def test_imagefolder(tmp_path):
    exp = make_imagefolder(tmp_path)
    src = read_source(cfg("imagefolder", tmp_path))
    assert src.classes == exp["classes"]
    assert list(src.splits["train"].labels) == [0, 0, 0, 1, 1, 1]
    assert not any("left out" in n for n in src.notes)
    # Sub-folders of a class folder hold its images too (as torchvision's ImageFolder reads
    # them); a file whose suffix is not an image's is left out, and the notes say so.
    cat = tmp_path / "train" / exp["classes"][0]
    (cat / "2019").mkdir()
    (cat / "2019" / "a.jpg").write_bytes((cat / "0.png").read_bytes())
    (cat / "clip.gif").write_bytes(b"GIF89a")
    (cat / "2019" / "notes.txt").write_text("x")
    src = read_source(cfg("imagefolder", tmp_path))
    assert list(src.splits["train"].labels) == [0, 0, 0, 0, 1, 1, 1]
    assert src.splits["train"].entries[:4] == [str(cat / "0.png"), str(cat / "1.png"),
                                               str(cat / "2.png"), str(cat / "2019" / "a.jpg")]
    (note,) = [n for n in src.notes if "left out" in n]
    assert note.startswith(f"2 file(s) under {tmp_path} were left out") and ".gif, .txt" in note
    # Linked folders are followed, a link back up the tree is not (it would label the other
    # classes' images as this one's), nor is a folder twice.
    dog = tmp_path / "train" / exp["classes"][1]
    (dog / "up").symlink_to("..")
    (dog / "self").symlink_to(".")
    (cat / "2019-again").symlink_to(cat / "2019")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jpg").write_bytes((cat / "0.png").read_bytes())
    (dog / "more").symlink_to(tmp_path / "elsewhere")
    src = read_source(cfg("imagefolder", tmp_path))
    assert list(src.splits["train"].labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert src.splits["train"].entries[-1] == str(dog / "more" / "b.jpg")
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(UserError, match="classes that train/ lacks"):
        read_source(cfg("imagefolder", tmp_path))


def test_an_image_folder_without_val_holds_out_a_share_of_each_class(tmp_path):
    """torchvision's own layout (root/<class>/...) or train/ alone: --val-fraction holds out
    that share of each class, by path hash, the same split every time."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for c, n in (("cat", 10), ("dog", 5), ("eel", 1)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 24, 24))
    with pytest.raises(UserError, match=r"has no val/ folder: .*--val-fraction 0.1"):
        read_source(cfg("imagefolder", root))
    src = read_source(cfg("imagefolder", root, val_fraction=0.2))
    train, val = src.splits["train"], src.splits["val"]
    assert src.classes == ["cat", "dog", "eel"]
    # round(0.2 * n) of each class, at least one of two or more; a lone image stays in train.
    assert list(val.labels) == [0, 0, 1] and list(train.labels) == [0] * 8 + [1] * 4 + [2]
    assert sorted(train.entries + val.entries) == sorted(str(p) for p in root.rglob("*.jpg"))
    assert read_source(cfg("imagefolder", root, val_fraction=0.2)).splits["val"].entries == val.entries
    assert any(n.startswith(f"val is held out of {root}: 0.2 of each class's images (3 of 16)") for n in src.notes)
    assert src.info["val_held_out"]["fraction"] == 0.2
    # Another image in a class moves at most one of the others across.
    (root / "cat" / "10.jpg").write_bytes(jpeg_bytes(rng, 24, 24))
    again = read_source(cfg("imagefolder", root, val_fraction=0.2)).splits["val"].entries
    assert len(set(val.entries) - set(again)) <= 1

    (tmp_path / "split" / "train").mkdir(parents=True)
    (root / "cat").rename(tmp_path / "split" / "train" / "cat")
    (root / "dog").rename(tmp_path / "split" / "train" / "dog")
    src = read_source(cfg("imagefolder", tmp_path / "split", val_fraction=0.5))
    assert src.classes == ["cat", "dog"] and len(src.splits["val"].entries) == 6 + 3  # half up
    (tmp_path / "split" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has its own val/: drop --val-fraction"):
        read_source(cfg("imagefolder", tmp_path / "split", val_fraction=0.5))
    with pytest.raises(ConfigError, match=r"--val-fraction must be in \(0, 1\)"):
        validate_prepare(cfg("imagefolder", root, val_fraction=1.0))
    with pytest.raises(ConfigError, match="cifar10 has its own val split"):
        validate_prepare(cfg("cifar10", root, val_fraction=0.1))


def test_an_image_folder_trains_as_its_images_call_for(tmp_path):
    """32 px images (digits, icons) keep their size and CIFAR's augmentation; photos get
    ImageNet's; --family and --resolution override either."""
    make_imagefolder(tmp_path / "small", size=(32, 32))
    small = read_source(cfg("imagefolder", tmp_path / "small"))
    assert (small.card.family, small.card.augment, small.card.resolution) == ("small", "translate_flip", 32)
    assert small.card.write.write_mode == "raw"
    assert any("median image is 32 px" in n and "small family" in n for n in small.notes)
    make_imagefolder(tmp_path / "photos", size=(96, 128), per_class=2)
    photos = read_source(cfg("imagefolder", tmp_path / "photos"))
    assert (photos.card.family, photos.card.augment) == ("imagenet", "rrc_flip")
    assert any("median image is 128 px" in n and "imagenet family" in n for n in photos.notes)
    forced = read_source(cfg("imagefolder", tmp_path / "small", family="imagenet", resolution=48))
    assert (forced.card.family, forced.card.resolution, forced.card.eval_resolution) == ("imagenet", 48, 48)
    # The official sets keep their cards unless told.
    assert read_source(cfg("cifar10", make_cifar(tmp_path / "c")[0])).card.family == "small"


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("P", "PNG")])
def test_decode_image_is_rgb(mode, fmt):
    data = jpeg_bytes(np.random.default_rng(0), 20, 30, mode=mode, fmt=fmt)
    out = decode_image(data)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(out, reference)


def test_synthetic_is_seeded_and_class_dependent():
    spec = PrepareConfig().synthetic
    a, b = synthetic_image(spec, "train", 3), synthetic_image(spec, "train", 3)
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    assert not np.array_equal(a, synthetic_image(spec, "val", 3))
    means = [np.mean([synthetic_image(spec, "train", c + 10 * j).mean((0, 1)) for j in range(5)], 0)
             for c in range(spec.num_classes)]
    gaps = [np.abs(means[i] - means[j]).max() for i in range(10) for j in range(i)]
    assert min(gaps) > 5  # each pair of classes differs in mean colour by > 5/255


def test_prepare_config_validation():
    with pytest.raises(ConfigError, match="unknown key colour"):
        PrepareConfig.from_dict({"dataset": "cifar10", "colour": 1})
    with pytest.raises(ConfigError, match="needs --source"):
        validate_prepare(PrepareConfig(dataset="cifar10", out="x"))
    with pytest.raises(ConfigError, match="jpeg_quality"):
        validate_prepare(PrepareConfig(out="x", jpeg_quality=101))
    round_trip = PrepareConfig.from_dict(PrepareConfig(out="x", max_resolution=64).to_dict())
    assert round_trip.max_resolution == 64


def test_cli_prepare_checks_before_submitting(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "cifar10", "--source", str(tmp_path / "nope.tar.gz")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["prepare", "mnist", "--source", "x"])
    assert r.exit_code == 2 and "unknown dataset" in r.output
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    r = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "store")])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "s"), "--size", "50",
                            "--write-mode", "zip", "--dry-run"])
    assert r.exit_code == 2 and "write_mode" in r.output
    r = runner.invoke(app, ["prepare", "synthetic", "--out", "rel/s", "--size", "50", "--dry-run"])
    assert r.exit_code == 0 and '"train_size": 50' in r.output and '"out": "/' in r.output


def test_decompression_bombs_and_unexpected_formats_are_refused():
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000  # a small file claiming 144 Mpx
    with pytest.raises(ValueError, match="decompression bomb"):
        decode_image(bomb.getvalue())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ValueError, match="not an image in JPEG"):
        decode_image(eps)


@pytest.mark.ffcv
@pytest.mark.timeout(120)
def test_a_non_utf8_file_name_is_a_listed_bad_file(tmp_path):
    from pipeline.data.prepare import prepare

    root = tmp_path / "src"
    make_imagefolder(root)
    bad = bytes(root / "train" / "cat") + b"/caf\xe9-\xff.jpg"
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    cfg = PrepareConfig(dataset="imagefolder", source=str(root), out=str(tmp_path / "out"),
                        max_resolution=32, skip_bad=True)
    lines: list[str] = []
    m = prepare(cfg, log=lines.append)
    assert len(m.skipped) == 1 and "caf" in m.skipped[0]["path"]
    assert any("unreadable image" in line and "caf" in line for line in lines)


@pytest.mark.timeout(120)
def test_archives_claiming_more_than_the_format_allows_are_refused_before_reading(tmp_path):
    """A .mat whose header claims 10 million images, and a 200 kB CIFAR tar.gz with a member
    that inflates past the largest the format has: one line, nothing loaded."""
    import gzip
    import struct
    import tarfile

    from scipy.io import savemat

    from pipeline.data.readers import MAX_MEMBER_BYTES

    make_svhn(tmp_path, n_train=4, n_test=2)
    train = tmp_path / "train_32x32.mat"
    savemat(train, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((4, 1), np.uint8)})
    data = bytearray(train.read_bytes())
    # First element, uncompressed: tag (8), array flags (16), dims tag (8), then 4 x int32.
    assert struct.unpack_from("<4i", data, 128 + 32) == (32, 32, 3, 4)
    struct.pack_into("<i", data, 128 + 32 + 12, 10_000_000)
    train.write_bytes(bytes(data))
    with pytest.raises(UserError, match="X claims 10,000,000 images, more than the official 73,257"):
        read_source(cfg("svhn", tmp_path))

    archive = tmp_path / "cifar-10-python.tar.gz"
    big = MAX_MEMBER_BYTES + 1
    with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))
    assert archive.stat().st_size < 1_000_000
    with pytest.raises(UserError, match=f"data_batch_1 is {big:,} bytes, more than the format allows"):
        read_source(cfg("cifar10", archive))


def test_an_image_file_over_the_byte_cap_is_refused_unread(tmp_path):
    from pipeline.data.readers import MAX_IMAGE_BYTES, FileSplit

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(ValueError, match="over the 268,435,456-byte cap"):
        FileSplit([(str(huge), 0)]).image(0)
