"""FFCV loader vs the torchvision baseline on the same images, same augmentation, same workers.

    .venv/bin/python benchmarks/loader.py [--workers 2] [--small 20000] [--jpegs 600]

Two sets, both generated here (seeded) so the run needs no downloads:
- 32x32: CIFAR-like arrays; baseline = an in-memory Dataset like torchvision's CIFAR10
  (PIL image -> RandomCrop(32, padding=4) -> flip -> ToTensor -> Normalize) + DataLoader;
  FFCV = a raw store, translate + flip + normalise.
- JPEG: an ImageFolder of JPEGs of varied sizes (300-500 px); baseline = ImageFolder +
  RandomResizedCrop(224) + flip + ToTensor + Normalize + DataLoader; FFCV = stores written
  with several settings, RandomResizedCrop(224) + flip + normalise.
FFCV hands batches over as training takes them (`data.channels_last`, on by default: NHWC
memory, which the channels_last net reads as is); the "NCHW copy" row adds the copy to
contiguous NCHW that a net in torch's default layout would need, like the baseline's tensors.
Prints images/s per loader (one warm-up epoch, then timed epochs), the ratio to the baseline,
and the prepare throughput of each store.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _time_epochs(loader, epochs: int) -> float:
    for _ in loader:
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            n += len(x)
    return n / (time.perf_counter() - start)


class _ArrayDataset:
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _baseline_small(images, labels, mean, std, workers, batch, epochs):
    import torch
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dl = torch.utils.data.DataLoader(_ArrayDataset(images, labels, tf), batch_size=batch, shuffle=True,
                                     num_workers=workers, persistent_workers=True, drop_last=True)
    return _time_epochs(dl, epochs)


def _baseline_folder(root, mean, std, workers, batch, epochs):
    import torch
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dl = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                     num_workers=workers, persistent_workers=True, drop_last=True)
    return _time_epochs(dl, epochs)


def _ffcv(store, workers, batch, epochs, resolution=None, channels_last=True):
    from pipeline.config import DataSection
    from pipeline.data.loaders import make_loader

    cfg = DataSection(augment=True, loader_workers=workers, channels_last=channels_last, resolution=resolution)
    loader, _ = make_loader(store, "train", batch, cfg)
    return _time_epochs(loader, epochs)


def _prepare(cfg, log=lambda s: None) -> float:
    from pipeline.data.prepare import prepare

    start = time.perf_counter()
    m = prepare(cfg, log=log)
    total = m.splits["train"].count + m.splits["val"].count
    return total / (time.perf_counter() - start)


def main() -> None:
    import torch
    from PIL import Image

    from pipeline.data.prepare_config import PrepareConfig, SyntheticSpec
    from pipeline.data.readers import synthetic_image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small", type=int, default=20000, help="32x32 images")
    p.add_argument("--jpegs", type=int, default=600, help="JPEG images (300-500 px)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    rows = []
    try:
        spec = SyntheticSpec(train_size=args.small, val_size=64, resolution=32, seed=1)
        small = PrepareConfig(dataset="synthetic", out=str(work / "small"), synthetic=spec,
                              workers=args.workers)
        write_rate = _prepare(small)
        images = np.stack([synthetic_image(spec, "train", i) for i in range(args.small)])
        labels = np.arange(args.small) % spec.num_classes
        mean, std = [0.5] * 3, [0.25] * 3
        base = _baseline_small(images, labels, mean, std, args.workers, 256, args.epochs)
        rows.append(("32x32 translate+flip", "torchvision baseline", base, 1.0, "-"))
        for name, cl in (("ffcv raw", True), ("ffcv raw, NCHW copy", False)):
            fast = _ffcv(work / "small", args.workers, 256, args.epochs, channels_last=cl)
            rows.append(("32x32 translate+flip", name, fast, fast / base, f"{write_rate:,.0f}"))

        jspec = SyntheticSpec(train_size=args.jpegs, val_size=8, resolution=500, min_size=300,
                              num_classes=4, seed=2)
        folder = work / "jpegs"
        for split, n in (("train", args.jpegs), ("val", 8)):
            for i in range(n):
                d = folder / split / f"c{i % 4}"
                d.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(synthetic_image(jspec, split, i)).save(buf, "JPEG", quality=90)
                (d / f"{i}.jpg").write_bytes(buf.getvalue())
        base = _baseline_folder(folder / "train", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                args.workers, 32, args.epochs)
        rows.append(("JPEG 300-500px RRC 224", "torchvision baseline", base, 1.0, "-"))
        settings = [("proportion 400px 50% q90 (card)", dict(write_mode="proportion", max_resolution=400)),
                    ("proportion 500px 50% q90 (ffcv ex.)", dict(write_mode="proportion", max_resolution=500)),
                    ("jpg 256px q90", dict(write_mode="jpg", max_resolution=256)),
                    ("raw 256px", dict(write_mode="raw", max_resolution=256))]
        for name, kw in settings:
            out = work / f"store{len(rows)}"
            rate = _prepare(PrepareConfig(dataset="imagefolder", source=str(folder), out=str(out),
                                          workers=args.workers, **kw))
            fast = _ffcv(out, args.workers, 32, args.epochs, resolution=224)
            rows.append(("JPEG 300-500px RRC 224", f"ffcv {name}", fast, fast / base, f"{rate:,.0f}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ("set", "loader", "images/s", "vs baseline", "prepare images/s")
    table = [(s, l, f"{r:,.0f}", f"{x:.1f}x", w) for s, l, r, x, w in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # numba's finalizers print pages of harmless KeyError noise at interpreter exit.
    os._exit(0)
