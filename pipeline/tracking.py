"""Weights & Biases on rank 0 only, offline when there is no API key, never fatal.

    tracker = Tracker.start(cfg, run_id="densenet_bc100_k12-20261125-2015", run_dir=Path(...))
    tracker.log({"train/loss": 0.7}, step=120)
    tracker.use_dataset(manifest_path, name="cifar10")
    tracker.log_checkpoint(folder, aliases=["latest", "best"])
    tracker.finish(summary={"best_val_top1_error": 0.07})

Every call swallows W&B errors with one warning: tracking trouble must not stop training.
The API key is read by wandb from its own environment or settings, never from our config.
"""

from __future__ import annotations

import json
import os
import sys
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


def _warn(what: str, e: BaseException) -> None:
    print(f"warning: W&B {what} failed, training goes on: {type(e).__name__}: {str(e)[:200]}",
          file=sys.stderr, flush=True)


class Tracker:
    """A W&B run, or a no-op stand-in for other ranks and for `--wandb off`."""

    def __init__(self, run: Any = None, mode: str = "disabled", upload_to: str | None = None,
                 local_dir: Path | None = None) -> None:
        self.run = run
        self.mode = mode
        self.disabled = False
        # With run folders in an object store, W&B writes to a local scratch folder and
        # `finish` copies its files to `upload_to` (the run folder's wandb/).
        self.upload_to = upload_to
        self.local_dir = local_dir

    @classmethod
    def start(cls, cfg: Config, *, run_id: str, run_dir: str | Path, job_type: str = "train",
              name: str | None = None, group: str | None = None, primary: bool = True) -> "Tracker":
        mode = resolve_mode(cfg.tracking.wandb)
        if not primary or mode == "disabled":
            return cls()
        location = str(run_dir)
        run_dir = storage.local_scratch(location, "wandb")
        upload_to = storage.join(location, "wandb") if storage.is_uri(location) else None
        if cfg.tracking.wandb == "online" and mode == "offline":
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
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave training running
            _warn("init", e)
            return cls()
        tracker = cls(run, mode, upload_to, run_dir)
        if mode == "offline":
            where = (storage.join(upload_to, Path(run.dir).parent.relative_to(run_dir / "wandb").as_posix())
                     if upload_to else Path(run.dir).parent)
            print(f"W&B offline run: {where}; upload it later with `wandb sync {where}`", flush=True)
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
        self._guard("log", self.run.log if self.run else None, metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        def update() -> None:
            for k, v in values.items():
                self.run.summary[k] = v
        self._guard("summary", update)

    def use_dataset(self, manifest_path: Path, name: str, metadata: dict[str, Any]) -> None:
        """The store's manifest as a `dataset` artifact: used by the run (lineage) when online.

        W&B cannot `use_artifact` offline, so an offline run logs the same artifact instead;
        its metadata (and the run's config) carry the store path and manifest hash.
        """
        def use() -> None:
            import wandb

            art = wandb.Artifact(_safe_id(name), type="dataset", metadata=metadata)
            art.add_file(str(manifest_path), name="manifest.json")
            if self.mode == "offline":
                self.run.log_artifact(art, aliases=["used"])
            else:
                self.run.use_artifact(art)
        self._guard("dataset artifact", use)

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

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        def log() -> None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})
        self._guard("table", log)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if summary:
            self.summary(summary)
        self._guard("finish", self.run.finish if self.run else None)
        if self.run is not None and self.upload_to and self.local_dir is not None:
            try:
                storage.upload_dir(self.local_dir / "wandb", self.upload_to)
            except Exception as e:  # noqa: BLE001
                _warn(f"copying its files to {self.upload_to}", e)
        self.run = None


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:128]
