"""Weights & Biases on rank 0 only, offline when there is no API key, never fatal.

    tracker = Tracker.start(cfg, run_id="densenet_bc100_k12-20261125-2015", run_dir=Path(...))
    tracker.log({"train/loss": 0.7}, step=120)
    tracker.use_dataset(manifest_path, name="cifar10")
    tracker.log_checkpoint(folder, aliases=["latest", "best"])
    tracker.finish(summary={"best_val_top1_error": 0.07})

Every call swallows W&B errors with one warning: tracking trouble must not stop training.
The API key is read by wandb from its own environment or settings, never from our config.

On a cluster the W&B run does not live in a training worker: a worker can be killed at any
moment (a scheduler stopping a trial, `jobs stop`, a lost node), and W&B buffers what it was
given. The job driver starts a `Recorder` actor per run, which holds the run; rank 0 sends
it every log call and waits for the answer, so whatever was reported is in the W&B run
before the next step. The driver, which outlives the workers, ends the run and says how:

    name = start_recorder(cfg, run_id=..., run_dir=...)          # driver
    tracker = RemoteTracker.connect(name)                          # rank 0, also after a restart
    finish_recorder(name, "stopped_early")                         # driver
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import storage
from .config import Config


def resolve_mode(requested: str) -> str:
    """`online` without a key falls back to offline (with a hint); `off` disables W&B."""
    if requested == "off":
        return "disabled"
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_key()):
        return "offline"
    return requested


def _netrc_has_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def offline_line(where: str) -> str:
    """Where an offline run is and how to upload it: `wandb sync` reads a local folder only,
    so a run kept in object storage is copied down first."""
    if not storage.is_uri(where):
        return f"W&B offline run: {where}; upload it later with `wandb sync {where}`"
    plain = storage.display(where)
    scheme = plain.split("://", 1)[0]
    copy = {"s3": "aws s3 cp --recursive", "gs": "gcloud storage cp -r"}.get(scheme, "copy")
    local = plain.rstrip("/").rsplit("/", 1)[-1]
    return (f"W&B offline run: {plain}; upload it later: copy it to a disk ({copy} {plain} ./{local}), "
            f"then `wandb sync ./{local}`")


def _warn(what: str, e: BaseException) -> None:
    print(f"warning: W&B {what} failed, training goes on: {type(e).__name__}: {str(e)[:200]}",
          file=sys.stderr, flush=True)


# How a run ended -> the exit code its W&B run records (W&B shows non-zero as "failed");
# the summary's `ended` key names it exactly.
ENDED = {"finished": 0, "stopped_early": 0, "stopped_by_user": 143, "failed": 1}
# W&B's own step must only grow; a worker restarted from a checkpoint logs earlier steps
# again. Our step is a metric that the charts use as their x axis instead.
STEP_KEY = "trainer/global_step"
# How often the W&B files of a run kept in an object store are checked for changes to copy.
MIRROR_EVERY_S = 5.0


def _flush_settings(wandb, upload_to: str | None) -> dict[str, float]:
    """wandb-core writes a run's `.wandb` file every 15 s; a run copied into an object store
    has it written as often as the copies are made (a private setting, passed only where this
    W&B version has it)."""
    name = "x_transaction_log_flush_interval"
    if upload_to and name in getattr(wandb.Settings, "model_fields", {}):
        return {name: MIRROR_EVERY_S}
    return {}


class Tracker:
    """A W&B run, or a no-op stand-in for other ranks and for `--wandb off`."""

    def __init__(self, run: Any = None, mode: str = "disabled", upload_to: str | None = None,
                 local_dir: Path | None = None) -> None:
        self.run = run
        self.mode = mode
        self.disabled = False
        # With run folders in an object store, W&B writes to a local scratch folder and
        # `sync`/`finish` copy its files to `upload_to` (the run folder's wandb/).
        self.upload_to = upload_to
        self.local_dir = local_dir
        self.where: str | None = None
        self.best = math.inf
        self.epochs_done = 0
        self._copying = threading.Lock()
        self._stop_mirror = threading.Event()
        self._mirror: threading.Thread | None = None
        if run is not None and upload_to and local_dir is not None:
            # wandb-core writes the record after a checkpoint's copy has been made, so a copy
            # made only at checkpoints lags one epoch behind: a run that is held, or killed,
            # would leave its last epoch out of the object store. Copy changes as they come.
            self._mirror = threading.Thread(target=self._mirror_changes, daemon=True,
                                            name="densenet-pipe-wandb-mirror")
            self._mirror.start()

    @classmethod
    def start(cls, cfg: Config, *, run_id: str, run_dir: str | Path, job_type: str = "train",
              name: str | None = None, group: str | None = None, primary: bool = True,
              announce: bool = True) -> "Tracker":
        mode = resolve_mode(cfg.tracking.wandb)
        if not primary or mode == "disabled":
            return cls()
        location = str(run_dir)
        run_dir = storage.local_scratch(location, "wandb")
        upload_to = storage.join(location, "wandb") if storage.is_uri(location) else None
        if announce and cfg.tracking.wandb == "online" and mode == "offline":
            print("W&B: no API key found, logging offline; upload later with "
                  f"`wandb sync {location}/wandb/offline-run-*`", flush=True)
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            # Artifact staging and cache default to the home folder; keep them with the run.
            for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                             ("WANDB_ARTIFACT_DIR", "artifacts")):
                os.environ.setdefault(var, str(run_dir / "wandb" / sub))
            run = wandb.init(
                project=cfg.tracking.project, entity=cfg.tracking.entity,
                group=group or cfg.tracking.group, tags=cfg.tracking.tags or None,
                job_type=job_type, name=name or run_id, id=_safe_id(run_id), resume="allow",
                dir=str(run_dir), mode=mode, config=cfg.to_dict(),
                settings=wandb.Settings(silent=True, console="off", **_flush_settings(wandb, upload_to)),
            )
            run.define_metric(STEP_KEY)
            for prefix in ("step/*", "epoch/*"):
                run.define_metric(prefix, step_metric=STEP_KEY)
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
            _warn("init", e)
            return cls()
        tracker = cls(run, mode, upload_to, run_dir)
        if mode == "offline":
            tracker.where = str(storage.join(upload_to, Path(run.dir).parent.relative_to(run_dir / "wandb").as_posix())
                                if upload_to else Path(run.dir).parent)
            if announce:
                print(offline_line(tracker.where), flush=True)
        return tracker

    @property
    def active(self) -> bool:
        return self.run is not None and not self.disabled

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            _warn(what, e)
            self.disabled = True
            return None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log `metrics` at our `step`; an `epoch/...` row also keeps the summary current."""
        if not self.active:
            return
        row = dict(metrics) if step is None else {**metrics, STEP_KEY: step}
        self._guard("log", self.run.log, row)
        if "epoch/epoch" in metrics:
            self.epochs_done = max(self.epochs_done, int(metrics["epoch/epoch"]))
            if "epoch/val_top1_error" in metrics:
                self.best = min(self.best, float(metrics["epoch/val_top1_error"]))
            self.summary({"epochs_done": self.epochs_done,
                          **({"best_val_top1_error": self.best} if self.best < math.inf else {})})

    def summary(self, values: dict[str, Any]) -> None:
        def update() -> None:
            for k, v in values.items():
                self.run.summary[k] = v
        self._guard("summary", update)

    def use_dataset(self, manifest_text: str, name: str, metadata: dict[str, Any]) -> None:
        """The store's manifest as a `dataset` artifact: used by the run (lineage) when online.

        W&B cannot `use_artifact` offline, so an offline run logs the same artifact instead;
        its metadata (and the run's config) carry the store path and manifest hash.
        """
        def use() -> None:
            import wandb

            path = (self.local_dir or Path(".")) / f"{_safe_id(name)}-manifest.json"
            path.write_text(manifest_text)
            art = wandb.Artifact(_safe_id(name), type="dataset", metadata=metadata)
            art.add_file(str(path), name="manifest.json")
            if self.mode == "offline":
                self.run.log_artifact(art, aliases=["used"])
            else:
                self.run.use_artifact(art)
        self._guard("dataset artifact", use)

    def use_init(self, source: str, sha256: str, metadata: dict[str, Any]) -> None:
        """The weights a fine-tune started from, as a `model` artifact named by their sha256,
        by reference (not copied): used by the run (lineage) when online, logged with the
        alias `used` offline, as `use_dataset` does."""
        def use() -> None:
            import wandb

            art = wandb.Artifact(f"init-{sha256[:16]}", type="model",
                                 metadata={**metadata, "source": source, "sha256": sha256})
            art.add_reference(Path(source).resolve().as_uri(), name=Path(source).name)
            if self.mode == "offline":
                self.run.log_artifact(art, aliases=["used"])
            else:
                self.run.use_artifact(art)
        self._guard("init artifact", use)

    def log_checkpoint(self, folder: str | Path, name: str, aliases: list[str], metadata: dict[str, Any]) -> None:
        """A checkpoint as a `model` artifact; by reference, so large weights are not copied."""
        def log() -> None:
            import wandb

            if storage.is_uri(folder):
                # W&B references objects through each store's own SDK (boto3, google-cloud-
                # storage), which the project does not need; the artifact names the location.
                art = wandb.Artifact(_safe_id(name), type="model",
                                     metadata={**metadata, "uri": str(folder)})
                pointer = (self.local_dir or Path(".")) / f"{storage.name(folder)}.json"
                pointer.write_text(json.dumps({"uri": str(folder), **metadata}, indent=2) + "\n")
                art.add_file(str(pointer), name="checkpoint.json")
            else:
                art = wandb.Artifact(_safe_id(name), type="model", metadata=metadata)
                art.add_reference(Path(folder).resolve().as_uri(), name=Path(folder).name)
            self.run.log_artifact(art, aliases=aliases)
        self._guard("checkpoint artifact", log)
        self.sync()

    def sync(self) -> bool:
        """Copy the W&B files of a run kept in an object store out of the local scratch folder;
        False when the copy failed (with a warning)."""
        if self.run is None or not self.upload_to or self.local_dir is None:
            return True
        with self._copying:
            try:
                storage.upload_dir(self.local_dir / "wandb", self.upload_to)
            except Exception as e:  # noqa: BLE001
                _warn(f"copying its files to {self.upload_to}", e)
                return False
        return True

    def _files_state(self) -> set[tuple[str, int, int]]:
        found = set()
        for file in (self.local_dir / "wandb").rglob("*"):
            with contextlib.suppress(OSError):
                st = file.stat()
                found.add((str(file), st.st_size, st.st_mtime_ns))
        return found

    def _mirror_changes(self) -> None:
        copied = self._files_state()
        while not self._stop_mirror.wait(MIRROR_EVERY_S):
            now = self._files_state()
            if now != copied:
                if not self.sync():
                    return  # one warning, not one every few seconds; checkpoints and the end still copy
                copied = now

    def log_export(self, files: list[Path], name: str, aliases: list[str], metadata: dict[str, Any],
                   registry: str | None = None) -> None:
        """An exported model (its file and sidecar) as a `model` artifact; online, linked into
        the W&B model registry collection `registry`."""
        def log() -> None:
            import wandb

            art = wandb.Artifact(_safe_id(name), type="model", metadata=metadata)
            for file in files:
                art.add_file(str(file), name=file.name)
            self.run.log_artifact(art, aliases=aliases)
            if registry:
                self.run.link_artifact(art, f"wandb-registry-model/{registry}")
        self._guard("export artifact", log)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        def log() -> None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})
        self._guard("table", log)

    def finish(self, summary: dict[str, Any] | None = None, ended: str = "finished") -> None:
        """End the run: `ended` is a key of ENDED and sets the exit code W&B records."""
        if self.run is None:
            return
        self.summary({**(summary or {}), "ended": ended})
        record = None
        if self.mode == "offline" and self.active:
            record = Path(self.run.dir).parent / f"run-{self.run.id}.wandb"
        if self.active:
            self._guard("finish", self.run.finish, exit_code=ENDED[ended])
        else:
            # W&B failed earlier and was warned about once: the run is still ended, quietly,
            # or this process keeps an unfinished run that its next `wandb.init` gets back.
            with contextlib.suppress(Exception):
                self.run.finish(exit_code=ENDED[ended])
        if record is not None:
            _wait_for_exit_record(record)
        if self._mirror is not None:
            self._stop_mirror.set()
            self._mirror.join()
        if self.sync() and self.upload_to and self.local_dir is not None:
            # Every file is in the run's location now; the stand-in folder goes.
            shutil.rmtree(self.local_dir, ignore_errors=True)
        self.run = None


RECORDER_NAMESPACE = "densenet-pipe"
# Recorders this process started (the job driver), ended on a normal exit or a stop signal.
_OWNED: dict[str, Any] = {}


def recorder_name(run_id: str) -> str:
    """The Recorder actor's name: the run and the Ray job it belongs to. Run names are the
    user's (two people's `--name baseline` in their own storage can train at once on one
    cluster); the job id keeps one job's rank 0 off another job's W&B run."""
    import ray

    return f"wandb-{ray.get_runtime_context().get_job_id()}-{_safe_id(run_id)}"


# The Tracker methods rank 0 calls through the driver's Recorder (`RemoteTracker`).
FORWARDED = frozenset({"log", "summary", "use_dataset", "use_init", "log_checkpoint"})


class Recorder:
    """The Ray actor that holds one run's W&B run for the job driver that started it."""

    def __init__(self, cfg: dict[str, Any], run_id: str, run_dir: str, job_type: str,
                 group: str | None, name: str | None = None) -> None:
        # Its own wandb-core: a WANDB_SERVICE inherited from whoever started the node would
        # put every run of the cluster through one other process, which stalls and dies.
        os.environ.pop("WANDB_SERVICE", None)
        self.tracker = Tracker.start(Config.from_dict(cfg), run_id=run_id, run_dir=run_dir,
                                     job_type=job_type, name=name, group=group, announce=False)
        self.attached = 0

    def where(self) -> tuple[bool, str | None]:
        return self.tracker.active, self.tracker.where

    def attach(self) -> bool:
        """A rank 0 (re)starts; every start after the first is a restart of the worker group."""
        self.attached += 1
        if self.attached > 1:
            self.tracker.summary({"worker_restarts": self.attached - 1})
        return self.tracker.active

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if method not in FORWARDED:
            raise ValueError(f"no tracker method {method}")
        getattr(self.tracker, method)(*args, **kwargs)

    def finish(self, ended: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        done = {"epochs_done": self.tracker.epochs_done, "best_val_top1_error": self.tracker.best}
        self.tracker.finish(summary, ended=ended)
        # Stop this actor's wandb-core now, while the actor is alive: left to wandb's atexit
        # hook, it finds the service already killed with the actor's process tree and prints
        # a ConnectionResetError traceback into the user's console.
        import wandb

        try:
            wandb.teardown()
        except Exception as e:  # noqa: BLE001
            _warn("teardown", e)
        return done


def start_recorder(cfg: Config, *, run_id: str, run_dir: str | Path, group: str | None = None,
                   job_type: str = "train", dataset: tuple[str, str, dict[str, Any]] | None = None,
                   announce: bool = True, name: str | None = None) -> str | None:
    """Start (or find) the Recorder actor for `run_id` on this node; its name, or None when
    W&B is off or could not start. `dataset` is (manifest JSON text, artifact name, metadata)."""
    if resolve_mode(cfg.tracking.wandb) == "disabled":
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = recorder_name(run_id)
    try:
        # On the driver's node: paths in the config resolve there as they do for the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        handle = ray.remote(num_cpus=0, max_restarts=0)(Recorder).options(
            name=actor, namespace=RECORDER_NAMESPACE, get_if_exists=True, scheduling_strategy=here,
        ).remote(cfg.to_dict(), run_id, str(run_dir), job_type, group, name)
        active, where = ray.get(handle.where.remote(), timeout=300)
    except Exception as e:  # noqa: BLE001
        _warn("recorder start", e)
        return None
    if not active:
        return None
    _OWNED[actor] = handle
    if dataset is not None:
        handle.call.remote("use_dataset", *dataset)
    if announce and where:
        if cfg.tracking.wandb == "online":
            print("W&B: no API key found, logging offline", flush=True)
        print(offline_line(where), flush=True)
    return actor


def finish_recorder(name: str | None, ended: str, summary: dict[str, Any] | None = None) -> None:
    """End the W&B run held by recorder `name` (one this process started) and stop the actor."""
    handle = _OWNED.pop(name, None) if name else None
    if handle is None:
        return
    import ray

    try:
        ray.get(handle.finish.remote(ended, summary), timeout=120)
    except Exception as e:  # noqa: BLE001
        _warn("finish", e)
    try:
        # Gracefully, so wandb's own exit hooks run; `ray.kill` would cut them off.
        handle.__ray_terminate__.remote()
    except Exception:  # noqa: BLE001 - already gone
        pass


def finish_all_recorders(ended: str) -> None:
    for name in list(_OWNED):
        finish_recorder(name, ended)


class RemoteTracker:
    """Rank 0's handle on the driver's Recorder: each call returns once W&B has the data.

    `finish` only records the summary: the driver ends the run, knowing how it ended.
    """

    def __init__(self, handle: Any = None) -> None:
        self.handle = handle

    @classmethod
    def connect(cls, name: str, wait_s: float = 60.0) -> "RemoteTracker":
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            try:
                handle = ray.get_actor(name, namespace=RECORDER_NAMESPACE)
                active = ray.get(handle.attach.remote(), timeout=wait_s)
                return cls(handle if active else None)
            except ValueError:
                if time.monotonic() > deadline:
                    _warn("connect", RuntimeError(f"no recorder {name}"))
                    return cls()
                time.sleep(0.5)
            except Exception as e:  # noqa: BLE001
                _warn("connect", e)
                return cls()

    @property
    def active(self) -> bool:
        return self.handle is not None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.handle is None:
            return
        import ray

        try:
            ray.get(self.handle.call.remote(method, *args, **kwargs), timeout=300)
        except ray.exceptions.RayTaskError as e:
            # The call failed inside a recorder that lives on: the next calls still reach it.
            _warn(method, getattr(e, "cause", None) or e)
        except Exception as e:  # noqa: BLE001 - the recorder is gone or hangs: stop calling it
            _warn(method, e)
            self.handle = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._call("log", metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self._call("summary", values)

    def use_dataset(self, manifest_text: str, name: str, metadata: dict[str, Any]) -> None:
        self._call("use_dataset", manifest_text, name, metadata)

    def use_init(self, source: str, sha256: str, metadata: dict[str, Any]) -> None:
        self._call("use_init", source, sha256, metadata)

    def log_checkpoint(self, folder: str | Path, name: str, aliases: list[str], metadata: dict[str, Any]) -> None:
        self._call("log_checkpoint", folder, name, aliases, metadata)

    def finish(self, summary: dict[str, Any] | None = None, ended: str = "finished") -> None:
        if summary:
            self.summary(summary)


def _wait_for_exit_record(path: Path, timeout: float = 60.0) -> None:
    """`run.finish` can return before wandb-core has written the run's file to its end; the
    file is whole once its exit record is in it."""
    from .wandb_records import NotAWandbFile, read_records

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
                return
        except (OSError, NotAWandbFile):
            pass
        time.sleep(0.1)
    _warn("finish", TimeoutError(f"{path} has no exit record after {timeout:g} s"))


def new_run_id(name: str) -> str:
    """The W&B id of a new run: its name and a random suffix. W&B ids are unique in a project,
    and a run started with an id that exists resumes that run: with the name alone, two
    users' `--name baseline` runs (or a run started again after its folder was deleted)
    would be written into one W&B run, the second's steps dropped as out of order."""
    import secrets

    return f"{_safe_id(name)[:119]}-{secrets.token_hex(4)}"


def run_id_of(cfg: Config) -> str:
    """A training run's W&B id: the one it started with, or for a run started before ids
    were kept, its name."""
    return cfg.tracking.run_id or cfg.cluster.run_name


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:128]
