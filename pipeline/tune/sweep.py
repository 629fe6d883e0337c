"""Runs a sweep inside the sweep job: a Tune function per trial, each a Ray Train run, or
for a trial of one worker the worker loop in the trial's own process (`runs.trial_in_process`).

    folder = run(cfg)   # cfg.sweep filled and checked; cfg.cluster.storage and a sweep name set

Layout under storage/<sweep name>/: Tune's experiment state, `trials/<trial>/` (each trial's
Ray Train run: checkpoints, config.json, history.json, curves.png, its W&B offline run),
and the results: `results.csv`, `results.json`, `val_error_vs_params_macs.png`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .. import runs, storage
from ..config import Config, apply_overrides, validate
from ..errors import JobFailed, last_line
from ..models import spec as model_spec
from ..tracking import new_run_id, recorder_name
from ..train.plots import save_png
from .space import plan_space, sample_overrides

# The trial function only waits on its TorchTrainer; Tune refuses a zero-CPU trial.
TRIAL_CPU = 0.01
COLUMNS = ["trial", "growth_rate", "depth", "params", "macs", "best_val_top1_error",
           "epochs_run", "stopped_early", "time_s", "overrides"]


def base_config(cfg: Config) -> Config:
    s = cfg.sweep
    return apply_overrides(cfg, {"model.name": model_spec.family_preset(s.family),
                                 "model.bottleneck": s.family == "densenet_bc",
                                 "tracking.group": s.name})


def in_process(cfg: Config) -> bool:
    c = cfg.cluster
    return runs.trial_in_process(c.nodes, c.workers_per_node, c.use_gpu, c.min_nodes)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What Tune reserves for a trial's own process: the worker's share when the loop runs
    there, else TRIAL_CPU (it only waits on its TorchTrainer)."""
    c = cfg.cluster
    if in_process(cfg):
        return {"cpu": c.cpus_per_worker, **({"gpu": 1} if c.use_gpu else {})}
    return {"cpu": TRIAL_CPU}


def trial_config(base: Config, overrides: dict[str, Any], trial_name: str, trials_dir: str) -> Config:
    # A trial's W&B id is its Tune trial name (random per sweep), not the sweep's id.
    changes = {**overrides, "cluster.run_name": trial_name, "cluster.storage": str(trials_dir),
               "train.resume": False, "tracking.run_id": None}
    if not in_process(base):
        # The trial function holds TRIAL_CPU on some node; its workers ask for that much less,
        # so a node with a whole number of CPUs still fits its share of workers beside the trial.
        changes["cluster.cpus_per_worker"] = max(TRIAL_CPU, base.cluster.cpus_per_worker - TRIAL_CPU)
    return validate(apply_overrides(base, changes))


def _trial_fn(base_dict: dict[str, Any], trials_dir: str, manifest_sha256: str, tracked: bool):
    def trial(params: dict[str, Any]) -> None:
        import ray.tune

        from ..train import checkpoint
        from ..train.trainer import finish_run, loop_config

        name = ray.tune.get_context().get_trial_name()
        cfg = trial_config(Config.from_dict(base_dict), params, name, trials_dir)
        folder = storage.join(trials_dir, name)
        # A trial cut short (the sweep job stopped) goes on from its newest whole checkpoint;
        # Ray Train would start it again from scratch.
        if storage.is_dir(folder) and checkpoint.newest(folder, say=lambda _line: None) is not None:
            cfg = apply_overrides(cfg, {"train.resume": True})
        # A trial that ran before the sweep job died continues from its own checkpoints.
        storage.makedirs(folder)
        cfg.save(storage.join(folder, "config.json"))
        # The sweep driver's TrialRecorders callback holds this trial's W&B run.
        tracker = recorder_name(name) if tracked else None
        if in_process(cfg):
            from ..train.loop import TuneSession, train_loop

            train_loop(loop_config(cfg, folder, manifest_sha256, tracker, 1, trial=True),
                       TuneSession(folder, cfg.train.keep_checkpoints, cfg.cluster.use_gpu))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            from ..train.trainer import build_trainer, plan_placement

            build_trainer(cfg, plan_placement(cfg), folder, manifest_sha256,
                          callbacks=[TuneReportCallback()], tracker=tracker, trial=True).fit()
        finish_run(cfg, folder)

    return trial


def _trial_recorders(base: Config, trials_dir: str, max_epochs: int, dataset):
    """A Tune callback, run in the sweep driver, that starts each trial's W&B Recorder and
    ends it saying how the trial ended: the trial's own processes may be killed at any time."""
    from ray.tune import Callback

    from .. import tracking

    class TrialRecorders(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            name = str(trial)
            cfg = trial_config(base, dict(trial.config), name, trials_dir)
            tracking.start_recorder(cfg, run_id=name, run_dir=storage.join(trials_dir, name),
                                    group=cfg.tracking.group, dataset=dataset, announce=False)

        def on_trial_complete(self, iteration, trials, trial, **info):
            epochs = int((trial.last_result or {}).get("epoch", 0))
            early = epochs < max_epochs
            tracking.finish_recorder(recorder_name(str(trial)), "stopped_early" if early else "finished",
                                     {"stopped_early": early})

        def on_trial_error(self, iteration, trials, trial, **info):
            tracking.finish_recorder(recorder_name(str(trial)), "failed", {"stopped_early": False})

    return TrialRecorders()


def _max_concurrent(cfg: Config) -> int:
    import ray

    from ..train.trainer import connect

    connect()
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    c = cfg.cluster
    per_trial = c.nodes * (c.workers_per_node or 1)
    cpus = sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))
    return max(1, int(cpus // (per_trial * c.cpus_per_worker)))


def run(cfg: Config, manifest, manifest_sha256: str = "") -> str:
    import ray.tune as tune

    from ..tracking import resolve_mode
    from ..train.loop import dataset_artifact
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.sweep
    plan = plan_space(cfg)
    for line in plan.dropped:
        print(line, flush=True)
    folder = storage.join(cfg.cluster.storage, s.name)
    # Resuming needs Tune's saved state; a new sweep must not meet anything at its path.
    there = tune.Tuner.can_restore(folder) if s.resume else storage.exists(folder)
    runs.check_new_or_resumed("sweep", s.name, cfg.cluster.storage, s.resume, there)
    if s.resume and not storage.is_uri(folder):
        from pathlib import Path

        runs.check_private_folder(Path(folder), "sweep folder")
    base = base_config(cfg)
    from ..train.trainer import check_nodes

    check_nodes(cfg, manifest_sha256, 0.0)
    if s.resume:
        runs.hold_folder(folder, "sweep", s.name)
        runs.check_same_store("sweep", s.name, (runs.saved_sweep(folder) or {}).get("manifest_sha256"),
                              cfg.data.store, manifest_sha256)
    elif not storage.claim_dir(folder):
        # Another job took the name since the check above (two submitted at once).
        runs.check_new_or_resumed("sweep", s.name, cfg.cluster.storage, False, True)
    else:
        runs.hold_folder(folder, "sweep", s.name)
        if not cfg.tracking.run_id:
            cfg = apply_overrides(cfg, {"tracking.run_id": new_run_id(s.name)})
        runs.save_sweep(folder, cfg, manifest_sha256)
    trials_dir = storage.join(folder, "trials")
    tracked = resolve_mode(cfg.tracking.wandb) != "disabled"
    trial = tune.with_resources(_trial_fn(base.to_dict(), trials_dir, manifest_sha256, tracked),
                                trial_resources(base))
    callbacks = []
    if tracked:
        callbacks.append(_trial_recorders(base, trials_dir, cfg.train.epochs, dataset_artifact(manifest)))
    if s.resume:
        print(f"resuming sweep {s.name}: finished and failed trials are kept", flush=True)
        # A failed trial stays failed (its error is in the results; Tune already retried it
        # cluster.max_failures times); resuming runs the trials that were cut short.
        tuner = tune.Tuner.restore(folder, trainable=trial, resume_unfinished=True,
                                   resume_errored=False)
        # Callbacks are not part of Tune's saved state; they are set again on restore.
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                   grace_period=s.grace_period, reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        search_alg = None
        if s.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch()
        samples = 1 if s.search == "grid" else s.samples
        concurrent = _max_concurrent(cfg)
        print(f"sweep {s.name}: {plan.grid_size() * samples} trial(s), up to {concurrent} at once, "
              f"{s.scheduler} on val_top1_error", flush=True)
        tuner = tune.Tuner(
            trial,
            param_space=sample_overrides(plan),
            tune_config=tune.TuneConfig(metric="val_top1_error", mode="min", scheduler=scheduler,
                                        search_alg=search_alg, num_samples=samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=s.name, storage_path=cfg.cluster.storage,
                                      failure_config=tune.FailureConfig(max_failures=cfg.cluster.max_failures),
                                      callbacks=callbacks),
        )
    from .. import tracking
    from .lines import TrialLines

    try:
        with TrialLines.printing():
            grid = tuner.fit()
    except BaseException as e:
        # `jobs stop` (SIGTERM, which Ray turns into SystemExit) or a crash of Tune itself.
        tracking.finish_all_recorders("stopped_by_user" if isinstance(e, (SystemExit, KeyboardInterrupt))
                                      else "failed")
        raise
    tracking.finish_all_recorders("finished")
    rows = collect(grid, base, cfg.train.epochs, trials_dir)
    if not rows:
        raise JobFailed(f"sweep {s.name} produced no results: see the trial errors above")
    write_results(folder, rows)
    print_table(rows)
    log_table(cfg, folder, rows)
    errors = [r for r in grid if r.error]
    if errors:
        raise JobFailed(f"{len(errors)} trial(s) failed, the first with {last_line(errors[0].error)}")
    return folder


def collect(grid, base: Config, max_epochs: int, trials_dir: str) -> list[dict[str, Any]]:
    """One row per trial; `trial` names its folder under trials/ (Tune's own folder name
    extends it with the params and a timestamp)."""
    names = storage.listdir(trials_dir)
    rows = []
    for result in grid:
        tune_dir = storage.name(result.path)
        trial = next((n for n in names if tune_dir.startswith(n + "_")), tune_dir)
        df = result.metrics_dataframe
        if df is None or df.empty or "val_top1_error" not in df:
            continue
        params = dict(result.config)
        cfg = apply_overrides(base, params)
        spec = cfg.model_spec()
        counts = spec.complexity()
        epochs_run = int(df["epoch"].max())
        rows.append({
            "trial": trial,
            "growth_rate": spec.growth_rate, "depth": spec.depth,
            "params": counts["params"], "macs": counts["macs"],
            "best_val_top1_error": float(df["val_top1_error"].min()),
            "epochs_run": epochs_run, "stopped_early": epochs_run < max_epochs,
            "time_s": float(df["epoch_time_s"].sum()),
            "overrides": json.dumps(params, sort_keys=True),
        })
    return sorted(rows, key=lambda r: r["best_val_top1_error"])


def write_results(folder: str, rows: list[dict[str, Any]]) -> None:
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    storage.write_text(storage.join(folder, "results.csv"), table.getvalue())
    storage.write_text(storage.join(folder, "results.json"), json.dumps(rows, indent=2) + "\n")
    plot(rows, storage.join(folder, "val_error_vs_params_macs.png"))


def plot(rows: list[dict[str, Any]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "macs", "MACs (G)")):
        scale = 1e6 if key == "params" else 1e9
        for r in rows:
            ax.scatter(r[key] / scale, 100 * r["best_val_top1_error"],
                       marker="x" if r["stopped_early"] else "o")
            ax.annotate(f"L={r['depth']},k={r['growth_rate']}", (r[key] / scale, 100 * r["best_val_top1_error"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("best val top-1 error (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("val error against model size (x: stopped early by the scheduler)")
    fig.tight_layout()
    return save_png(fig, path)


def print_table(rows: list[dict[str, Any]]) -> None:
    from ..tables import format_table

    print(format_table(
        ["trial", "k", "L", "params", "MACs", "val err", "epochs", "time s"],
        [[r["trial"], r["growth_rate"], r["depth"], f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}G",
          f"{r['best_val_top1_error']:.4f}", f"{r['epochs_run']}{'*' if r['stopped_early'] else ''}",
          f"{r['time_s']:.1f}"] for r in rows]), flush=True)
    if any(r["stopped_early"] for r in rows):
        print("* stopped early by the scheduler", flush=True)


def log_table(cfg: Config, folder: str, rows: list[dict[str, Any]]) -> None:
    """The sweep's table as a W&B table, in a summary run of the sweep's group."""
    from ..tracking import Tracker

    tracker = Tracker.start(cfg, run_id=f"{cfg.tracking.run_id or cfg.sweep.name}-summary",
                            name=f"{cfg.sweep.name}-summary", run_dir=folder, job_type="sweep",
                            group=cfg.sweep.name)
    tracker.log_table("sweep/results", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
    tracker.finish(summary={"best_val_top1_error": rows[0]["best_val_top1_error"],
                            "best_trial": rows[0]["trial"]})


