"""Tiny datasets in the real official formats, for the data tests.

Each builder writes files the way the official releases lay them out and returns what a
correct reader must find (arrays, labels, class lists).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _pickle_batch(d: dict) -> bytes:
    # The official files are Python 2 pickles with bytes keys; protocol 2 is what they use.
    return pickle.dumps(d, protocol=2)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar(root: Path, which: int = 10, per_batch: int = 4, n_test: int = 6, seed: int = 0,
               extracted: bool = False) -> tuple[Path, dict]:
    """cifar-10-python.tar.gz (5 train batches + test) or cifar-100-python.tar.gz."""
    rng = np.random.default_rng(seed)
    k = 10 if which == 10 else 100
    folder = "cifar-10-batches-py" if which == 10 else "cifar-100-python"
    files: dict[str, bytes] = {}
    train_x, train_y, coarse_y = [], [], []

    def batch(n: int, name: str) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, n)]
        d = {b"batch_label": name.encode(), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        if which == 10:
            d[b"labels"] = labels
        else:
            d[b"fine_labels"] = labels
            d[b"coarse_labels"] = [v // 5 for v in labels]
        return d

    names = [f"data_batch_{i}" for i in range(1, 6)] if which == 10 else ["train"]
    for name in names:
        b = batch(per_batch * (1 if which == 10 else 5), name)
        files[name] = _pickle_batch(b)
        train_x.append(b[b"data"])
        train_y += b[b"labels" if which == 10 else b"fine_labels"]
        coarse_y += b.get(b"coarse_labels", [])
    test = batch(n_test, "test")
    files["test_batch" if which == 10 else "test"] = _pickle_batch(test)
    if which == 10:
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        files["batches.meta"] = _pickle_batch({b"label_names": [c.encode() for c in classes],
                                               b"num_cases_per_batch": per_batch})
    else:
        classes = [f"fine_{i}" for i in range(100)]
        files["meta"] = _pickle_batch({b"fine_label_names": [c.encode() for c in classes],
                                       b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})
    root.mkdir(parents=True, exist_ok=True)
    if extracted:
        path = root / folder
        path.mkdir()
        for n, data in files.items():
            (path / n).write_bytes(data)
    else:
        path = root / f"{'cifar-10' if which == 10 else 'cifar-100'}-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for n, data in files.items():
                _add_bytes(tar, f"{folder}/{n}", data)

    def hwc(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    test_key = b"labels" if which == 10 else b"fine_labels"
    return path, {"train_x": hwc(np.concatenate(train_x)), "train_y": np.array(train_y),
                  "val_x": hwc(test[b"data"]), "val_y": np.array(test[test_key]),
                  "classes": classes, "coarse_y": np.array(coarse_y)}


def make_svhn(root: Path, n_train: int = 12, n_test: int = 8, n_extra: int = 0,
              seed: int = 0) -> dict:
    """train_32x32.mat / test_32x32.mat (/ extra_32x32.mat) as the official format 2."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        if not n:
            continue
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # digit 0 is stored as 10
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
        out[name] = (x.transpose(3, 0, 1, 2), (y.reshape(-1) % 10).astype(np.int64))
    return out


def jpeg_bytes(rng: np.random.Generator, h: int, w: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


WNIDS = ["n01440764", "n01443537", "n01484850"]
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark"}


def _devkit_tar(path: Path, val_wnids: list[str], wnids: list[str]) -> None:
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height",
              "num_train_images"]
    rows = [(i + 1, w, WORDS.get(w, w), "gloss", 0, 0, 1300) for i, w in enumerate(wnids)]
    rows.append((len(wnids) + 1, "n00001740", "entity", "root", 3, 18, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        synsets[i, 0] = tuple(np.array([[v]]) if isinstance(v, int) else np.array([v]) for v in r)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    ids = {w: i + 1 for i, w in enumerate(wnids)}
    gt = "".join(f"{ids[w]}\n" for w in val_wnids).encode()
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)


def make_ilsvrc(root: Path, *, per_class: int = 3, val_per_class: int = 2, train: str = "folders",
                val: str = "devkit", messy: bool = True, seed: int = 0,
                wnids: list[str] | None = None, sides: tuple[int, int] = (24, 64)) -> dict:
    """An ILSVRC2012-style tree with real JPEGs of varied sizes.

    train: "folders" (train/<wnid>/*.JPEG) or "tar" (ILSVRC2012_img_train.tar of per-class
    tars). val: "devkit" (flat val/ + ILSVRC2012_devkit_t12.tar.gz), "loc" (flat val/ +
    LOC_val_solution.csv + LOC_synset_mapping.txt), "sorted" (val/<wnid>/), or "none" (flat
    val/ without ground truth). With `messy`, train holds a CMYK JPEG, a grayscale JPEG, a
    PNG named .JPEG and one truncated JPEG (returned as "truncated").
    """
    wnids = wnids or WNIDS
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train_files: dict[str, list[tuple[str, bytes]]] = {}
    truncated = None
    for ci, w in enumerate(wnids):
        items = []
        for j in range(per_class):
            h, wd = (int(v) for v in rng.integers(*sides, 2))
            name = f"{w}_{j + 1}.JPEG"
            data = jpeg_bytes(rng, h, wd)
            if messy and ci == 0 and j == 0:
                data = jpeg_bytes(rng, h, wd, mode="CMYK")
            elif messy and ci == 0 and j == 1:
                data = jpeg_bytes(rng, h, wd, mode="L")
            elif messy and ci == 1 and j == 0:
                data = jpeg_bytes(rng, h, wd, fmt="PNG")
            elif messy and ci == 1 and j == 1:
                data = data[: len(data) // 2]
                truncated = name
            items.append((name, data))
        train_files[w] = items
    if train == "folders":
        for w, items in train_files.items():
            (root / "train" / w).mkdir(parents=True)
            for name, data in items:
                (root / "train" / w / name).write_bytes(data)
    else:
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for w, items in train_files.items():
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as inner:
                    for name, data in items:
                        _add_bytes(inner, name, data)
                _add_bytes(outer, f"{w}.tar", buf.getvalue())
    val_labels: list[str] = [w for w in wnids for _ in range(val_per_class)]
    order = rng.permutation(len(val_labels))
    val_labels = [val_labels[i] for i in order]
    val_names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(val_labels))]
    (root / "val").mkdir()
    for name, w in zip(val_names, val_labels):
        h, wd = (int(v) for v in rng.integers(*sides, 2))
        target = root / "val" / w / name if val == "sorted" else root / "val" / name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(jpeg_bytes(rng, h, wd))
    if val == "devkit":
        _devkit_tar(root / "ILSVRC2012_devkit_t12.tar.gz", val_labels, wnids)
    elif val == "loc":
        lines = ["ImageId,PredictionString"] + [
            f"{Path(n).stem},{w} 0 0 10 10 {w} 1 1 5 5" for n, w in zip(val_names, val_labels)]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS.get(w, w)}\n" for w in wnids))
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    # Val images in the order a reader lists them: sorted file names (flat) or by class.
    if val == "sorted":
        val_expected = sorted(zip(val_labels, val_names))
        val_y = [index[w] for w, _ in val_expected]
    else:
        val_y = [index[w] for _, w in sorted(zip(val_names, val_labels))]
    return {"classes": classes, "truncated": truncated, "val_y": np.array(val_y),
            "train_count": per_class * len(wnids), "val_count": len(val_labels)}


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3,
                     seed: int = 0, size: tuple[int, int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(per_class):
                h, w = size or tuple(int(v) for v in rng.integers(24, 64, 2))
                (d / f"{j}.png").write_bytes(jpeg_bytes(rng, h, w, fmt="PNG"))
    return {"classes": sorted(classes), "count": per_class * len(classes)}


def make_synthetic_store(out: Path, train: int, val: int, **synthetic) -> Path:
    """A real FFCV store of the learnable synthetic set (32x32, 10 classes unless told)."""
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": str(out), "workers": 1,
                                     "synthetic": {"train_size": train, "val_size": val, **synthetic}}),
            log=lambda _: None)
    return out
