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

import os
import sys
from pathlib import Path
from typing import Any

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

    def __init__(self, run: Any = None, mode: str = "disabled") -> None:
        self.run = run
        self.mode = mode
        self.disabled = False

    @classmethod
    def start(cls, cfg: Config, *, run_id: str, run_dir: Path, job_type: str = "train",
              name: str | None = None, group: str | None = None, primary: bool = True) -> "Tracker":
        mode = resolve_mode(cfg.tracking.wandb)
        if not primary or mode == "disabled":
            return cls()
        if cfg.tracking.wandb == "online" and mode == "offline":
            print("W&B: no API key found, logging offline; upload later with "
                  f"`wandb sync {run_dir}/wandb/offline-run-*`", flush=True)
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
        tracker = cls(run, mode)
        if mode == "offline":
            print(f"W&B offline run: {run.dir}; upload it later with `wandb sync {Path(run.dir).parent}`",
                  flush=True)
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

    def log_checkpoint(self, folder: Path, name: str, aliases: list[str], metadata: dict[str, Any]) -> None:
        """A checkpoint as a `model` artifact; by reference, so large weights are not copied."""
        def log() -> None:
            import wandb

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
        self.run = None


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:128]
