"""`predict` and `export` on a real checkpoint and a real FFCV store (in-process, no Ray).

The checkpoint is written by `checkpoint.save` with a net of random weights: predicting
and exporting do not care how well a net learned, only that every path gives the same
answer for the same image.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb  # noqa: F401  (imported here, not first inside a deep CliRunner stack)
from typer.testing import CliRunner

from fixtures_data import make_imagefolder
from pipeline import config as C
from pipeline.cli import app
from pipeline.data.prepare import prepare
from pipeline.data.prepare_config import PrepareConfig
from pipeline.data.readers import decode_image
from pipeline.errors import UserError
from pipeline.infer import eval_transform, image_files, load, predict_paths, predict_store
from pipeline.models.densenet import build
from pipeline.models.spec import resolve
from pipeline.train import checkpoint

pytestmark = pytest.mark.ffcv
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "pets"
    make_imagefolder(root, classes=("cat", "dog", "fox"), per_class=4)
    return root


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "pets"
    # raw: the store holds the decoded pixels, so FFCV's val tensors and ours start equal.
    prepare(PrepareConfig.from_dict({"dataset": "imagefolder", "source": str(folder), "out": str(out),
                                     "workers": 1, "write_mode": "raw"}), log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> Path:
    from pipeline.data.store import open_store

    manifest = open_store(store)
    spec = resolve("densenet_simple", num_classes=3)
    torch.manual_seed(0)
    model = build(spec).eval()
    cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {"data.store": str(store)}))
    folder = tmp_path_factory.mktemp("runs") / "pets-run"
    checkpoint.save(folder / "epoch-0001", {
        "model": model.state_dict(), "spec": spec.to_dict(), "config": cfg.to_dict(), "epoch": 1,
        "history": [], "store": {"path": str(store), "dataset": "imagefolder", "classes": manifest.classes,
                                 "mean": manifest.mean, "std": manifest.std, "resolution": manifest.resolution,
                                 "eval_resolution": manifest.eval_resolution, "family": manifest.family}})
    return folder


@pytest.mark.timeout(120)
def test_the_eval_transform_is_the_ffcv_val_pipelines(folder, store, run):
    from pipeline.config import DataSection
    from pipeline.data.loaders import make_loader

    net = load(run)
    assert net.preprocess.resolution < 64  # the images' size (24-63 px), not the card's 224
    files = image_files([folder / "val"])
    ours = np.stack([eval_transform(decode_image(f.read_bytes()), net.preprocess) for f in files])
    data = DataSection(store=str(store), loader_workers=1, eval_resolution=net.preprocess.resolution)
    loader, _ = make_loader(store, "val", 64, data, channels_last=False, crop_ratio=net.preprocess.crop_ratio)
    theirs = np.concatenate([images.numpy() for images, _ in loader])
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.timeout(120)
def test_predict_files_folders_and_a_store_agree_and_a_bad_image_is_a_row(folder, store, run, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    files = image_files([folder / "val"])
    r = runner.invoke(app, ["predict", str(run), str(folder / "val"), str(tmp_path / "broken.jpg"), "--in-process",
                            "--format", "json", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["input"] for row in rows] == [str(f) for f in files] + [str(tmp_path / "broken.jpg")]
    assert rows[-1]["top"] == [] and "not an image" in rows[-1]["error"]
    assert "1 of 13 image(s) could not be read" in r.stderr
    assert all(len(row["top"]) == 2 and row["top"][0]["probability"] >= row["top"][1]["probability"]
               for row in rows[:-1])
    # A folder named after a class labels its images (ImageFolder's layout), and the rows are
    # scored; the broken file's folder names no class.
    assert [row["label"] for row in rows[:-1]] == [f.parent.name for f in files] and "label" not in rows[-1]
    wrong = sum(row["top"][0]["class"] != row["label"] for row in rows[:-1])
    assert f"top-1 error {wrong / 12:.4f} on 12 labelled image(s)" in r.stderr, r.stderr

    by_store = predict_store(load(run), store, top_k=1)
    assert [row["top"][0]["class"] for row in by_store] == [row["top"][0]["class"] for row in rows[:-1]]
    assert [row["label"] for row in by_store] == [f.parent.name for f in files]
    # A store's split file stands for that split of the store; its train split is read as
    # for evaluation (in order, every image, the eval transform), as the files are.
    r = runner.invoke(app, ["predict", str(run), str(store / "train.beton"), "--in-process", "--format", "json"])
    assert r.exit_code == 0, r.output
    train_files = image_files([folder / "train"])
    train_rows = json.loads(r.stdout)
    assert [row["input"] for row in train_rows] == [f"{store}/train#{i}" for i in range(len(train_files))]
    assert [row["label"] for row in train_rows] == [f.parent.name for f in train_files]
    for a, b in zip(train_rows, predict_paths(load(run), train_files, top_k=1), strict=True):
        assert a["top"][0]["class"] == b["top"][0]["class"]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-3)

    # --out's suffix names the format when --format does not.
    out = tmp_path / "rows.csv"
    r = runner.invoke(app, ["predict", str(run / "epoch-0001"), str(files[0]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(io.StringIO(out.read_text())))
    assert row["input"] == str(files[0]) and row["top1"] == rows[0]["top"][0]["class"] and row["error"] == ""
    # An existing file is kept unless --force says to replace it.
    r = runner.invoke(app, ["predict", str(run), str(files[1]), "--out", str(out)])
    assert r.exit_code == 2 and f"{out} exists: pass --force" in r.stderr, r.output
    assert list(csv.DictReader(io.StringIO(out.read_text())))[0]["input"] == str(files[0])
    r = runner.invoke(app, ["predict", str(run), str(files[1]), "--out", str(out), "--force", "--format", "json",
                            "--epoch", "1"])
    assert r.exit_code == 0, r.output
    assert [row["input"] for row in json.loads(out.read_text())] == [str(files[1])]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_exports_load_with_their_own_readers_and_give_predicts_top1(fmt, folder, run, tmp_path):
    from pipeline.export import run_exported

    out = tmp_path / f"pets.{fmt}"
    # One format goes through W&B (offline: no key here): a `model` artifact of an export run.
    tracked = fmt == "safetensors"
    # The real CLI in its own process: inside CliRunner, deep in pytest's stack, CPython
    # 3.11.7's AST constructor (used by wandb's and onnxscript's first imports) has failed
    # with "AST constructor recursion depth mismatch" (fixed in 3.11.8, gh-106905).
    r = subprocess.run([str(Path(sys.executable).with_name("densenet-pipe")), "export", str(run),
                        "--format", fmt, "--out", str(out), "--wandb", "offline" if tracked else "off",
                        "--registry", "pets"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity on a fixed batch of 4: max abs difference" in r.stderr
    if tracked:
        from pipeline.wandb_records import RunView

        assert "--registry pets needs W&B online" in r.stderr, r.stderr
        (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
        view = RunView.read(record)
        assert "pets-run-safetensors" in view.artifacts and view.summary["export_format"] == "safetensors"
    else:
        assert not (tmp_path / "wandb").exists()
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["classes"] == ["cat", "dog", "fox"] and sidecar["format"] == fmt
    assert sidecar["source"]["sha256"] == load(run).sha256 and sidecar["parity"]["max_abs_difference"] <= 1e-4
    assert sidecar["architecture"]["name"] == "densenet_simple"

    net = load(run)
    files = image_files([folder / "val"])
    images = np.stack([eval_transform(decode_image(f.read_bytes()), net.preprocess) for f in files])
    spec = resolve("densenet_simple", num_classes=3)
    exported = run_exported(fmt, out, images, spec)
    expected = [row["top"][0]["index"] for row in predict_paths(net, files, top_k=1)]
    assert exported.argmax(1).tolist() == expected

    again = runner.invoke(app, ["export", str(run), "--format", fmt, "--out", str(out), "--wandb", "off"])
    assert again.exit_code == 2 and "exists: pass --force" in again.stderr


@pytest.mark.timeout(120)
def test_bad_input_to_predict_and_export_is_one_line(run, store, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign.pt").write_bytes(b"PK not ours")
    (tmp_path / "loose.beton").write_bytes(b"")
    cases = [
        (["predict", str(run), str(tmp_path / "empty"), "--in-process"], "holds no images"),
        # Refused before a cluster job is submitted for nothing (no cluster runs here).
        (["predict", str(run), str(tmp_path / "empty")], "holds no images"),
        (["predict", str(run), str(tmp_path / "loose.beton")], "FFCV file outside a store"),
        (["predict", str(run), f"{store}/train.beton", "--split", "val"], "but --split says val"),
        (["predict", str(run), str(tmp_path / "missing.jpg")], "does not exist"),
        (["predict", str(tmp_path / "foreign.pt"), str(tmp_path), "--in-process"], "not a densenet-pipe checkpoint"),
        (["predict", str(run), str(tmp_path), "--top-k", "0"], "--top-k must be >= 1"),
        (["predict", str(run), str(tmp_path / "missing"), str(tmp_path)], "missing does not exist"),
        (["predict", str(run), str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "no" / "rows.csv")],
         f"{tmp_path / 'no'} does not exist: create it"),
        (["predict", str(run), str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "empty")],
         "is a folder: name the file to write"),
        (["export", str(run), "--format", "tflite"], "'tflite' is not one of"),
        (["predict", str(run), str(tmp_path / "foreign.pt"), "--epoch", "2"],
         "no complete checkpoint of epoch 2 in"),
        (["export", str(run), "--format", "onnx", "--epoch", "2"], "it has epoch-0001: pick one of those"),
        (["export", str(run), "--format", "onnx", "--out", str(tmp_path / "no" / "such" / "m.onnx")],
         "does not exist: create it"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("error: ") and needle in line, (args, line)
    assert not list(tmp_path.rglob("*.onnx*"))


@pytest.mark.timeout(180)
def test_predict_reads_a_store_in_object_storage_from_a_staged_copy(store, run, s3_bucket, tmp_path, monkeypatch):
    from pipeline import storage

    uri = storage.join(s3_bucket, "stores", "pets")
    storage.upload_dir(store, uri)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the node's cache folder lives under it
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    lines: list[str] = []
    remote = predict_store(load(run), uri, top_k=1, say=lines.append)
    local = predict_store(load(run), store, top_k=1)
    assert [r["top"] for r in remote] == [r["top"] for r in local]
    assert [r["input"].split("#")[1] for r in remote] == [r["input"].split("#")[1] for r in local]
    assert remote[0]["input"].startswith("s3://runs/densenet-pipe/stores/pets/val#")  # no query
    assert len(lines) == 1 and ": staged at" in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.timeout(120)
def test_export_into_a_folder_takes_the_name_it_has_beside_the_checkpoint(run, tmp_path):
    from pipeline.export import export

    (tmp_path / "models").mkdir()
    sidecar = export(str(run), "safetensors", tmp_path / "models", wandb_mode="off", log=lambda _m: None)
    written = tmp_path / "models" / "pets-run-epoch-0001.safetensors"
    assert sidecar["path"] == str(written) and written.is_file()
    assert json.loads(written.with_name(written.name + ".json").read_text())["file"] == written.name
    with pytest.raises(UserError, match="exists: pass --force"):
        export(str(run), "safetensors", tmp_path / "models", wandb_mode="off", log=lambda _m: None)


@pytest.mark.timeout(120)
def test_evaluate_into_a_folder_writes_its_default_name_there(run, store, tmp_path, capsys):
    """`evaluate --out FOLDER` (the job's own code, here in-process): the result goes into
    the folder under the name it has beside the checkpoint (was: a traceback after the work);
    `--out FILE` replaces only an evaluation result."""
    from jobs import evaluate as job

    (tmp_path / "results").mkdir()
    job.run({"checkpoint": str(run), "store": str(store), "loader_workers": 1, "out": str(tmp_path / "results")})
    written = tmp_path / "results" / f"evaluation-{store.name}-none.json"
    assert json.loads(written.read_text())["images"] == 12
    assert f"wrote {written}" in capsys.readouterr().out
    # A result written before is replaced; any other file is kept, and nothing is evaluated.
    written.write_text(json.dumps({**json.loads(written.read_text()), "images": -1}))
    job.run({"checkpoint": str(run), "store": str(store), "loader_workers": 1, "out": str(written)})
    assert json.loads(written.read_text())["images"] == 12
    (tmp_path / "notes.json").write_text('{"mine": true}')
    with pytest.raises(UserError, match="exists and holds no evaluation result"):
        job.run({"checkpoint": str(run), "store": str(store), "out": str(tmp_path / "notes.json")})
    assert (tmp_path / "notes.json").read_text() == '{"mine": true}'



@pytest.mark.timeout(120)
def test_evaluate_without_data_reads_the_store_the_net_trained_on(run, store, tmp_path, capsys):
    """`evaluate RUN` is the next step after training: the checkpoint names its store. One
    that is gone, or a checkpoint that names none, is one line asking for --data."""
    from jobs import evaluate as job
    from pipeline.train.evaluate import trained_store

    job.run({"checkpoint": str(run), "loader_workers": 1, "out": str(tmp_path / "e.json")})
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["store"] == str(store) and result["images"] == 12 and result["store_trained_on"] is True
    assert f"data: {store} (the store the net trained on)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^the net trained on /gone/pets, which is not there now \(moved "
                                        r"or removed\): pass --data STORE"):
        trained_store({"store": {"path": "/gone/pets"}}, str(run))
    with pytest.raises(UserError, match=r"does not record the store it trained on: pass --data STORE$"):
        trained_store({"store": {}}, str(run))
