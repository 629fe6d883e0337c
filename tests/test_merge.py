"""Shards of a split merged into one .beton read back as the split written whole (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.merge import MergeError, data_chunks, merge_betons, read_layout, read_metadata
from pipeline.data.prepare_config import SyntheticSpec
from pipeline.data.readers import SyntheticSplit
from pipeline.data.sharded import shard_bounds
from pipeline.data.writer import WriteSettings, write_beton

pytestmark = [pytest.mark.ffcv]


def samples(path: Path) -> list[tuple[int, int, int, int, bytes]]:
    """(label, mode, width, height, stored image bytes) of every sample, from the file alone."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    size = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    data = path.read_bytes()
    image, label = r.metadata["f0"], r.metadata["f1"]
    return [(int(label[i]), int(image["mode"][i]), int(image["width"][i]), int(image["height"][i]),
             data[int(image["data_ptr"][i]):int(image["data_ptr"][i]) + size[int(image["data_ptr"][i])]])
            for i in range(len(r.metadata))]


def test_shard_bounds_are_contiguous_and_even():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    for n, k in ((1, 1), (7, 2), (1000, 8)):
        b = shard_bounds(n, k)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert max(s - a for a, s in b) - min(s - a for a, s in b) <= 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_merged_shards_equal_the_whole_split(tmp_path, mode):
    from ffcv.loader import Loader, OrderOption
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder

    # Images of varied sizes, so that samples differ in how many bytes they take.
    split = SyntheticSplit(SyntheticSpec(train_size=150, num_classes=7, resolution=96, min_size=40), "train")
    settings = WriteSettings(mode, jpeg_quality=90)
    whole = tmp_path / "whole.beton"
    write_beton(whole, split, settings, workers=1, log=lambda _: None)
    parts = []
    for i, (a, b) in enumerate(shard_bounds(len(split), 3)):
        p = tmp_path / f"part{i}.beton"
        write_beton(p, split, settings, workers=2, indices=range(a, b), log=lambda _: None)
        parts.append(p)
    merged = tmp_path / "merged.beton"
    layouts = [read_layout(p) for p in parts]
    assert merge_betons(merged, [(lay, data_chunks(p, lay, size=1 << 16)) for p, lay in zip(parts, layouts)]) == 150
    assert samples(merged) == samples(whole)
    # Read back with numpy alone, as the driver does, it is FFCV's own metadata.
    from ffcv.reader import Reader

    assert np.array_equal(read_metadata(merged, layouts[0]), Reader(str(merged)).metadata)

    # FFCV's own loader reads it: in file order, every image decodes as in the whole file;
    # in page-wise quasi-random order (which leans on page alignment), every sample comes once.
    def load(path: Path, order) -> tuple[np.ndarray, np.ndarray]:
        loader = Loader(str(path), batch_size=50, num_workers=1, order=order, seed=0,
                        pipelines={"image": [CenterCropRGBImageDecoder((40, 40), 1.0)],
                                   "label": [IntDecoder()]})
        xs, ys = zip(*((x.copy(), y.reshape(-1).copy()) for x, y in loader))
        return np.concatenate(xs), np.concatenate(ys)

    x_whole, y_whole = load(whole, OrderOption.SEQUENTIAL)
    x_merged, y_merged = load(merged, OrderOption.SEQUENTIAL)
    assert np.array_equal(x_merged, x_whole) and np.array_equal(y_merged, split.labels)
    _, y_quasi = load(merged, OrderOption.QUASI_RANDOM)
    assert sorted(y_quasi.tolist()) == sorted(split.labels.tolist())
    if mode == "raw":
        from ffcv.reader import Reader

        r = Reader(str(merged))
        assert int(r.header["alloc_table_ptr"]) % r.page_size == 0


@pytest.mark.timeout(120)
def test_merge_refuses_shards_of_other_layouts(tmp_path):
    a = SyntheticSplit(SyntheticSpec(train_size=4, resolution=32), "train")
    # An image over 2 MiB raw gets a larger page.
    b = SyntheticSplit(SyntheticSpec(train_size=1, resolution=1024), "train")
    write_beton(tmp_path / "a.beton", a, WriteSettings("raw"), workers=1, log=lambda _: None)
    write_beton(tmp_path / "b.beton", b, WriteSettings("raw"), workers=1, log=lambda _: None)
    la, lb = read_layout(tmp_path / "a.beton"), read_layout(tmp_path / "b.beton")
    with pytest.raises(MergeError, match="other fields"):
        merge_betons(tmp_path / "m.beton", [(la, []), (lb, [])])
    with pytest.raises(MergeError, match="bytes of pages"):
        merge_betons(tmp_path / "m.beton", [(la, [b"x"])])


@pytest.mark.timeout(120)
def test_shards_appended_as_they_finish_read_back_in_order_with_room_for_skipped_images(tmp_path):
    from ffcv.reader import Reader

    from pipeline.data.merge import MergedFile

    split = SyntheticSplit(SyntheticSpec(train_size=30, num_classes=3, resolution=48, min_size=20), "train")
    settings = WriteSettings("jpg", jpeg_quality=90)
    whole = tmp_path / "whole.beton"
    write_beton(whole, split, settings, workers=1, log=lambda _: None)
    # Room for 5 samples that never came (images a shard skipped): FFCV reads only the rows
    # the header counts, and finds every page by its pointer.
    merged = MergedFile(tmp_path / "merged.beton", capacity=35)
    # Appended in the order they finished, not in sample order: the rows still come in order.
    for i, (a, b) in [(2, (8, 30)), (0, (0, 7)), (1, (7, 8))]:
        p = tmp_path / f"part{i}.beton"
        write_beton(p, split, settings, workers=1, indices=range(a, b), log=lambda _: None)
        if i == 2:  # a shard on this machine's disk: the kernel copies its pages
            merged.append_file(read_layout(p), p, position=i)
        else:
            merged.append(read_layout(p), data_chunks(p, read_layout(p), size=1 << 12), position=i)
    assert merged.close() == 30
    assert samples(tmp_path / "merged.beton") == samples(whole)
    assert len(Reader(str(tmp_path / "merged.beton")).metadata) == 30
    over = MergedFile(tmp_path / "over.beton", capacity=6)
    with pytest.raises(MergeError, match="past the 6 samples"):
        over.append(read_layout(tmp_path / "part0.beton"), [])
    over.discard()


@pytest.mark.timeout(120)
def test_a_shard_cut_off_half_way_leaves_the_merge_as_it_was_and_can_come_again(tmp_path):
    """A piece's stream that ends in an error (its node lost) takes back what it had appended:
    the same piece streamed again from elsewhere merges into a file equal to the whole split."""
    from pipeline.data.merge import MergedFile

    split = SyntheticSplit(SyntheticSpec(train_size=20, num_classes=3, resolution=48, min_size=20), "train")
    settings = WriteSettings("raw")
    whole = tmp_path / "whole.beton"
    write_beton(whole, split, settings, workers=1, log=lambda _: None)
    parts = []
    for i, (a, b) in enumerate([(0, 12), (12, 20)]):
        parts.append(tmp_path / f"part{i}.beton")
        write_beton(parts[-1], split, settings, workers=1, indices=range(a, b), log=lambda _: None)
    merged = MergedFile(tmp_path / "merged.beton", capacity=20)
    merged.append(read_layout(parts[1]), data_chunks(parts[1], read_layout(parts[1]), size=1 << 12), position=1)
    before = (tmp_path / "merged.beton").stat().st_size

    def cut_off(chunks, after: int):
        for n, chunk in enumerate(chunks):
            if n == after:
                raise ConnectionError("the node is gone")
            yield chunk

    layout = read_layout(parts[0])
    assert layout.data_bytes > 3 * (1 << 12)
    with pytest.raises(ConnectionError):
        merged.append(layout, cut_off(data_chunks(parts[0], layout, size=1 << 12), after=3), position=0)
    assert (tmp_path / "merged.beton").stat().st_size == before
    merged.append(layout, data_chunks(parts[0], layout, size=1 << 12), position=0)
    assert merged.close() == 20
    assert samples(tmp_path / "merged.beton") == samples(whole)


def test_pieces_cover_each_split_in_order_large_first_and_small_splits_spread():
    from pipeline.data.sharded import Pieces

    plan = Pieces({"train": 27_000, "val": 3_375}, nodes=2, smallest=512)
    pieces = list(iter(plan.take, None))
    for split, n in (("train", 27_000), ("val", 3_375)):
        mine = [p for p in pieces if p.split == split]
        assert [p.index for p in mine] == list(range(len(mine)))
        assert mine[0].start == 0 and mine[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
    sizes = [p.stop - p.start for p in pieces]
    # At most a quarter of a node's share, then half of what is left each time: the pieces
    # that end last are small, so the nodes end together and little is left to merge.
    # (train's last piece is what train has left; val's then halve down to 512.)
    assert sizes == [3_797] * 7 + [421] + [1_688, 844, 512, 331]
    # A split smaller than SMALLEST per node still spreads over the nodes.
    tiny = list(iter(Pieces({"train": 9, "val": 3}, nodes=3, smallest=512).take, None))
    assert len([p for p in tiny if p.split == "val"]) == 3
    assert len([p for p in tiny if p.split == "train"]) >= 3


def test_a_piece_given_back_is_handed_out_again_whole_before_new_ones():
    from pipeline.data.sharded import Pieces

    plan = Pieces({"train": 27_000, "val": 3_375}, nodes=2, smallest=512)
    first, second = plan.take(), plan.take()
    plan.give_back(first)
    assert plan.take() == first
    # What is left to hand out counts the piece again: the next new piece is sized as if the
    # lost one had never been handed out, and the pieces still cover each split once.
    rest = list(iter(plan.take, None))
    assert [second.stop - second.start, *(p.stop - p.start for p in rest)] == [3_797] * 6 + [421] + [1_688, 844, 512, 331]
    train = sorted([first, second, *(p for p in rest if p.split == "train")], key=lambda p: p.index)
    assert [p.index for p in train] == list(range(len(train))) and train[-1].stop == 27_000


def test_a_node_copies_its_pieces_only_on_the_drivers_machine_and_in_its_folder(tmp_path):
    from pipeline.data.sharded import machine_id, on_drivers_machine

    (tmp_path / ".token").write_text("abc")
    assert on_drivers_machine(str(tmp_path), "abc", machine_id())
    # Another machine that sees the folder (a network filesystem) streams.
    assert not on_drivers_machine(str(tmp_path), "abc", "another-boot-id")
    # A folder that is not the driver's (another mount at the same path), or none at all.
    assert not on_drivers_machine(str(tmp_path), "xyz", machine_id())
    assert not on_drivers_machine(str(tmp_path / "absent"), "abc", machine_id())
    assert not on_drivers_machine(str(tmp_path), None, machine_id())


def test_a_writer_off_the_drivers_machine_writes_in_a_folder_of_its_own_and_removes_dead_ones(
        tmp_path, monkeypatch):
    # A writer on another machine writes its pieces in a temp folder named for its process.
    # One killed there (its node lost, the OOM killer) never ran `close`: the next writer on
    # that machine removes its folder, and leaves a live writer's alone.
    import os
    import subprocess
    import sys
    import tempfile

    from pipeline.data.prepare_config import PrepareConfig
    from pipeline.data.sharded import SHARD_PREFIX, NodeWriter, Piece

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live = temp / f"{SHARD_PREFIX}{gone.pid}-abc", temp / f"{SHARD_PREFIX}{os.getppid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "train-00000.beton").write_bytes(b"x")
    cfg = PrepareConfig.from_dict({"dataset": "synthetic", "out": str(tmp_path / "store"), "workers": 1,
                                   "synthetic": {"train_size": 24, "val_size": 8}})
    writer = NodeWriter(cfg.to_dict(), {"train": 24, "val": 8}, 1, str(tmp_path / "store"),
                        token=None, machine="another machine")
    written = writer.write(Piece("train", 0, 0, 12))
    piece = Path(written["path"])
    assert not written["shared"] and piece.is_file() and read_layout(piece).num_samples == 12
    assert piece.parent.parent == temp and piece.parent.name.startswith(f"{SHARD_PREFIX}{os.getpid()}-")
    assert not dead.exists() and live.is_dir()
    writer.close()
    assert not piece.parent.exists() and live.is_dir()
