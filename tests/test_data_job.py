"""`densenet-pipe prepare` through the real Ray job path, on the session's local cluster."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_data import make_cifar, make_ilsvrc, make_svhn
from test_merge import samples
from pipeline.cli import app
from pipeline.config import DataSection
from pipeline.data.store import open_store

pytestmark = [pytest.mark.ray, pytest.mark.ffcv]


def run(*args: str):
    return CliRunner().invoke(app, ["prepare", *args])


@pytest.mark.timeout(600)
def test_prepare_official_formats_as_ray_jobs(ray_cluster, tmp_path):
    from ffcv.pipeline.compiler import Compiler

    from pipeline.data.loaders import make_loader

    cifar, exp = make_cifar(tmp_path / "cifar", 10)
    r = run("cifar10", "--source", str(cifar), "--out", str(tmp_path / "s" / "cifar10"))
    assert r.exit_code == 0, r.output
    assert "prepared" in r.output
    # The driver writes with its own processes, so it holds CPUs for them (the 2 writers asked
    # for, capped at the 1 CPU a node here has) and their memory: Ray started it on a node
    # that has them.
    from pipeline import submit

    import urllib.parse

    server = submit.connect(None, start=False, note=lambda _m: None)
    (job,) = [j for j in server.list_jobs()
              if (j.get("metadata") or {}).get("densenet_pipe_job") == "prepare"][:1]
    # Ray runs an entrypoint under a supervisor actor that holds what the job asked for.
    query = urllib.parse.urlencode([("limit", 10000), ("detail", 1), ("filter_keys", "name"),
                                    ("filter_predicates", "="),
                                    ("filter_values", f"_ray_internal_job_actor_{job['submission_id']}")])
    (supervisor,) = server._json("GET", f"/api/v0/actors?{query}")["data"]["result"]["result"]
    assert supervisor["required_resources"].get("CPU") == 1, supervisor["required_resources"]
    from pipeline.cli.prepare import prepare_memory

    assert supervisor["required_resources"].get("memory") == prepare_memory(2), supervisor["required_resources"]
    nodes = {n["node_id"]: n for n in server.nodes()}
    assert nodes[job["driver_node_id"]]["resources_total"]["CPU"] >= 1
    Compiler.set_enabled(False)
    try:
        loader, m = make_loader(tmp_path / "s" / "cifar10", "val", 6,
                                DataSection(augment=False, channels_last=False, loader_workers=1))
        x, y = next(iter(loader))
        mean, std = np.array(m.mean)[:, None, None], np.array(m.std)[:, None, None]
        pixels = np.rint((x.numpy() * std + mean) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.array_equal(pixels, exp["val_x"]) and np.array_equal(y.numpy(), exp["val_y"])
    finally:
        Compiler.set_enabled(True)

    make_svhn(tmp_path / "svhn", n_train=6, n_test=4, n_extra=2)
    r = run("svhn", "--source", str(tmp_path / "svhn"), "--out", str(tmp_path / "s" / "svhn"))
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "s" / "svhn").splits["train"].count == 8

    ilsvrc = make_ilsvrc(tmp_path / "ilsvrc", train="tar", val="devkit")
    out = tmp_path / "s" / "imagenet"
    r = run("imagenet", "--source", str(tmp_path / "ilsvrc"), "--out", str(out), "--max-resolution", "48")
    assert r.exit_code == 2 and ilsvrc["truncated"] in r.output and not out.exists()
    r = run("imagenet", "--source", str(tmp_path / "ilsvrc"), "--out", str(out),
            "--max-resolution", "48", "--skip-bad", "--write-mode", "jpg")
    assert r.exit_code == 0, r.output
    assert len(open_store(out).skipped) == 1

    # The same source on every node of the cluster, in contiguous pieces handed to the nodes
    # as they free up, merged as they finish: the same samples in the same order, the same
    # encoded bytes, the unreadable image skipped in the piece that holds it. As on a cluster
    # of one node a machine, the pieces of the driver's node are copied from its disk and the
    # others' stream through Ray's object store.
    one = open_store(out)
    sharded = tmp_path / "sharded" / "imagenet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENSENET_PIPE_PIECES", "node")
        r = run("imagenet", "--source", str(tmp_path / "ilsvrc"), "--out", str(sharded),
                "--max-resolution", "48", "--skip-bad", "--write-mode", "jpg", "--nodes", "3")
    assert r.exit_code == 0, r.output
    three = open_store(sharded)
    here = re.search(r"node (\w{8}) \(this one\)", r.output)[1]
    for split in ("train", "val"):
        assert samples(three.beton(split)) == samples(one.beton(split))
        pieces = three.writer.shards[split]
        bounds = [(s["start"], s["stop"]) for s in pieces]
        assert bounds[0][0] == 0 and bounds[-1][1] == one.splits[split].count + (split == "train")
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        ways = re.search(rf"{split}: \d+ pieces .* (\d+) copied on this machine, (\d+) streamed", r.output)
        assert ways is not None, r.output
        assert (int(ways[1]), int(ways[2])) == (sum(s["node"] == here for s in pieces),
                                                 sum(s["node"] != here for s in pieces))
    # Each node took a piece first thing, so both ways ran.
    assert {s["node"] for split in ("train", "val") for s in three.writer.shards[split]} != {here}
    assert len({s["node"] for split in ("train", "val") for s in three.writer.shards[split]}) == 3
    assert three.writer.nodes == 3 and three.skipped == one.skipped
    # The console tells the job's progress as each piece lands (the writers' own lines stay in
    # the job's log): every piece once, on the node the manifest names, the count rising to all.
    told = re.findall(r"^(train|val)\[([\d,]+):([\d,]+)\] written on node (\w{8}) in [\d.]+ s: "
                      r"([\d,]+) of ([\d,]+) images", r.output, re.M)
    number = lambda text: int(text.replace(",", ""))  # noqa: E731
    assert sorted((t[0], number(t[1]), number(t[2]), t[3]) for t in told) == sorted(
        (split, s["start"], s["stop"], s["node"]) for split in ("train", "val") for s in three.writer.shards[split])
    counts = [number(t[4]) for t in told]
    everything = one.splits["train"].count + 1 + one.splits["val"].count
    assert counts == sorted(counts) and counts[-1] == everything and {number(t[5]) for t in told} == {everything}
    # Nothing of the pieces is left in the store.
    assert sorted(p.name for p in sharded.iterdir()) == ["manifest.json", "train.beton", "val.beton"]
    r = run("imagenet", "--source", str(tmp_path / "ilsvrc"), "--out", str(tmp_path / "s" / "x"),
            "--nodes", "4")
    assert r.exit_code == 2 and "--nodes 4 needs 4 nodes with CPUs; the cluster has 3" in r.output

    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(cifar.read_bytes()[:500])
    r = run("cifar10", "--source", str(bad), "--out", str(tmp_path / "s" / "bad"))
    assert r.exit_code == 2 and "truncated or not a tar archive" in r.output
    # tarfile's multi-line reason is cut to its first line, and the fix still follows it.
    (line,) = [ln for ln in r.output.splitlines() if "truncated or not a tar archive" in ln]
    assert line.endswith("or its extracted cifar-10-batches-py/"), line
    assert not (tmp_path / "s" / "bad").exists()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cifar10", "imagenet", "svhn"]


def _folder(root, seed: int):
    """An image folder of 24 train and 9 val JPEGs in 2 classes, each of its own size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 24), ("val", 9)):
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def _written_again_elsewhere(store, piece: str, node: str, one) -> None:
    """The piece (`train[8:16]`) lost on `node` was written by another node, nothing in the
    store came from the lost node, and the store is the 1-node store `one` sample by sample."""
    records = {(split, s["start"], s["stop"]): s["node"] for split in ("train", "val")
               for s in store.writer.shards[split]}
    split, bounds = piece.split("[")
    start, stop = (int(b.replace(",", "")) for b in bounds.rstrip("]").split(":"))
    assert records[(split, start, stop)] != node
    assert node not in records.values()
    for split in ("train", "val"):
        assert samples(store.beton(split)) == samples(one.beton(split))


@pytest.mark.timeout(300)
def test_a_writer_lost_mid_piece_hands_its_piece_to_the_nodes_left(ray_cluster, tmp_path, monkeypatch):
    """`prepare --nodes 3` with every writer held at its first piece; one writer is killed
    there (as a reclaimed spot node or the OOM killer would). Its piece goes to the nodes
    left, and the store is the 1-node store sample by sample."""
    import os
    import signal
    import time

    from pipeline import submit
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import HOLD_ENV, PrepareConfig

    _folder(tmp_path / "src", seed=3)
    one = prepare(PrepareConfig.from_dict({"dataset": "imagefolder", "source": str(tmp_path / "src"),
                                           "out": str(tmp_path / "one"), "write_mode": "jpg", "workers": 1}),
                  log=lambda _line: None)

    hold = tmp_path / "HOLD"
    hold.touch()
    monkeypatch.setenv(HOLD_ENV, str(hold))
    r = run("imagefolder", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "three"),
            "--write-mode", "jpg", "--nodes", "3", "--detach")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("HOLD.*"))) < 3:
        assert time.monotonic() < deadline, "the writers never reached their first piece"
        time.sleep(0.2)
    server = submit.connect(None, start=False, note=lambda _m: None)
    writers = [a for a in server.actors(job_id) if a["class_name"] == "NodeWriter"]
    assert len(writers) == 3, writers
    victim = writers[0]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    hold.unlink()

    r = CliRunner().invoke(app, ["jobs", "logs", job_id, "--follow"])
    assert r.exit_code == 0, r.output
    lost = re.search(r"warning: the writer on node (\w{8}) died writing ((?:train|val)\[[\d,]+:[\d,]+\]); "
                     r"the piece goes to the 2 node\(s\) left", r.output)
    assert lost is not None and lost[1] == victim["node_id"][:8], r.output
    _written_again_elsewhere(open_store(tmp_path / "three"), lost[2], lost[1], one)


@pytest.mark.kills_node
@pytest.mark.timeout(420)
def test_a_node_lost_after_writing_a_piece_before_it_reached_the_driver(ray_cluster, tmp_path, monkeypatch):
    """`prepare --nodes 3`, the pieces of the nodes off the driver's streamed to it (as on
    nodes that are machines of their own); the first streamed piece is held on its node, and
    that whole node is SIGKILLed there, its pages with it. The piece is written again on a
    node left; the store is the 1-node store sample by sample."""
    import time

    from fixtures_nodes import kill_node_running, same_node, wait_until_gone
    from pipeline import local_cluster, submit
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import HOLD_STREAMS_ENV, PIECES_ENV, PrepareConfig

    source = _folder(tmp_path / "src", seed=5)
    one = prepare(PrepareConfig.from_dict({"dataset": "imagefolder", "source": str(source),
                                           "out": str(tmp_path / "one"), "write_mode": "jpg", "workers": 1}),
                  log=lambda _line: None)
    hold = tmp_path / "HOLD"
    hold.touch()
    monkeypatch.setenv(HOLD_STREAMS_ENV, str(hold))
    monkeypatch.setenv(PIECES_ENV, "node")
    r = run("imagefolder", "--source", str(source), "--out", str(tmp_path / "three"),
            "--write-mode", "jpg", "--nodes", "3", "--detach")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while not (held := list(tmp_path.glob("HOLD.*"))):
        assert time.monotonic() < deadline, "no piece was streamed"
        time.sleep(0.2)
    stream = int(held[0].suffix[1:])
    server = submit.connect(None, start=False, note=lambda _m: None)
    (writer,) = [a for a in server.actors(job_id)
                 if a["class_name"] == "NodeWriter" and same_node(int(a["pid"]), stream)]
    try:
        assert kill_node_running(stream) is not None, "the streamed piece came from the head node"
        hold.unlink()
        r = CliRunner().invoke(app, ["jobs", "logs", job_id, "--follow"])
        assert r.exit_code == 0, r.output
        lost = re.search(r"warning: ((?:train|val)\[[\d,]+:[\d,]+\]) could not be read back from "
                         r"node (\w{8}) \(.+\); it is written again", r.output)
        assert lost is not None and lost[2] == writer["node_id"][:8], r.output
        _written_again_elsewhere(open_store(tmp_path / "three"), lost[1], lost[2], one)
    finally:
        hold.unlink(missing_ok=True)
        wait_until_gone(server, writer["node_id"])
        assert CliRunner().invoke(app, ["cluster", "up", "--nodes", "3", "--cpus-per-node", "1"]).exit_code == 0
    assert len(local_cluster.running().alive()) == 3
