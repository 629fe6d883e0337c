"""Check every alive node of the cluster: `densenet-pipe doctor [--burn-in SECONDS]`.

One Ray task per node, pinned by node id, imports what training needs (torch, torchvision,
ffcv, ray.train, wandb), reports versions, CPUs, GPUs and memory, and checks that bf16
autocast runs (on the GPU when the node has one, else on the CPU). With `burn_in_s` > 0 each
node also multiplies matrices for that long and reports its fp32 and bf16 throughput: a slow
or broken accelerator stands out. Exits 1 when any node has a problem or does not answer.

`quick` skips the imports and bf16 check: it only shows that every node runs tasks, in
seconds rather than the minute the training stack can take to import on a busy machine.

Config (JSON): {"burn_in_s": 0, "timeout_s": 300, "quick": false}.
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import Any

from jobs import common
from pipeline.errors import JobFailed
from pipeline.tables import format_table

MODULES = ("torch", "torchvision", "ffcv", "ray.train", "wandb")


@dataclass
class DoctorConfig:
    burn_in_s: float = 0.0
    # Per-node answers arrive as soon as each node is done; this bounds the slowest one.
    timeout_s: float = 300.0
    quick: bool = False


def probe(burn_in_s: float, quick: bool) -> dict[str, Any]:
    """Runs on one node: what it has and whether training's imports and bf16 work there."""
    import ray

    report: dict[str, Any] = {
        "node": ray.get_runtime_context().get_node_id()[:8],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "problems": [],
    }
    try:
        import psutil

        report["memory_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        report["memory_gib"] = None
    if not quick:
        _check_imports(report)
    if quick and burn_in_s <= 0:
        return report
    try:
        import torch
    except ImportError:
        if quick:
            report["problems"].append("torch: does not import (the burn-in needs it)")
        return report
    report["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    report["gpu_name"] = torch.cuda.get_device_name(0) if report["gpus"] else ""
    device = "cuda" if report["gpus"] else "cpu"
    if not quick:
        try:
            a = torch.randn(64, 64, device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                out = a @ a
            ok = out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
            report["bf16"] = "yes" if ok else "no"
        except Exception as e:  # noqa: BLE001 - a failing check is a finding, not a crash
            report["bf16"] = "no"
            report["problems"].append(f"bf16 on {device}: {type(e).__name__}: {e}")
    if burn_in_s > 0:
        report.update(_burn_in(torch, device, burn_in_s))
    return report


def _check_imports(report: dict[str, Any]) -> None:
    from importlib import metadata

    for name in MODULES:
        try:
            importlib.import_module(name)
            if name == "ray.train":
                importlib.import_module("ray.train.torch")
            # Distribution metadata, not __version__: ffcv 1.0.2 calls itself 0.0.3rc1.
            report[name] = metadata.version(name.split(".")[0])
        except Exception as e:  # noqa: BLE001 - any import failure is a finding, not a crash
            report[name] = "MISSING"
            report["problems"].append(f"{name}: {type(e).__name__}: {e}")


def _burn_in(torch: Any, device: str, seconds: float) -> dict[str, Any]:
    size = 4096 if device == "cuda" else 512
    results = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ b
            steps += 1
            if device == "cuda" and steps % 20 == 0:
                torch.cuda.synchronize()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        results[f"{label}_tflops"] = round(2 * size**3 * steps / elapsed / 1e12, 3)
    return results


def run(cfg: dict[str, Any]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.parsing import parse_dataclass

    conf = parse_dataclass(DoctorConfig, cfg)
    ray.init(logging_level="WARNING", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(f"doctor: checking {len(nodes)} node(s)" + (" (quick)" if conf.quick else "")
          + (f", {conf.burn_in_s:g} s burn-in each" if conf.burn_in_s > 0 else ""), flush=True)
    remote = ray.remote(probe)
    pending = {}
    for node in nodes:
        ref = remote.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(conf.burn_in_s, conf.quick)
        pending[ref] = node
    reports = []
    deadline = time.monotonic() + conf.timeout_s + conf.burn_in_s
    while pending and time.monotonic() < deadline:
        done, _ = ray.wait(list(pending), num_returns=1,
                           timeout=max(0.1, deadline - time.monotonic()))
        for ref in done:
            node = pending.pop(ref)
            try:
                report = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a node that crashed is a finding
                report = {"node": node["NodeID"][:8], "problems": [f"probe failed: {e}"]}
            report["ray_cpus"] = node["Resources"].get("CPU", 0)
            report["ray_gpus"] = node["Resources"].get("GPU", 0)
            reports.append(report)
            print(f"doctor: node {report['node']} answered", flush=True)
    for node in pending.values():
        reports.append({"node": node["NodeID"][:8], "host": node.get("NodeManagerHostname"),
                        "problems": [f"no answer within {conf.timeout_s:g} s"]})
    _print(reports, conf.quick, conf.burn_in_s > 0)
    bad = [r for r in reports if r["problems"]]
    for report in bad:
        for problem in report["problems"]:
            print(f"node {report['node']}: {problem}", flush=True)
    if bad:
        raise JobFailed(f"{len(bad)} of {len(reports)} node(s) have problems (listed above)")
    print(f"doctor: all {len(reports)} node(s) ready", flush=True)


def _print(reports: list[dict[str, Any]], quick: bool, burn_in: bool) -> None:
    headers = ["NODE", "HOST", "CPUS", "GPUS", "MEM GiB", "PYTHON", "RAY"]
    if not quick:
        headers += ["BF16", "TORCH", "TORCHVISION", "FFCV", "RAY TRAIN", "WANDB"]
    if burn_in:
        headers += ["FP32 TFLOPS", "BF16 TFLOPS"]
    rows = []
    for r in sorted(reports, key=lambda r: r["node"]):
        # CPUs Ray offers on the node / CPUs the machine has.
        cpus = (f"{r['ray_cpus']:g}/{r.get('cpus', '?')}"
                if isinstance(r.get("ray_cpus"), (int, float)) else "?")
        gpus = f"{r.get('gpus', r.get('ray_gpus', '?')):g}" if isinstance(
            r.get("gpus", r.get("ray_gpus")), (int, float)) else "?"
        if r.get("gpu_name"):
            gpus += f" {r['gpu_name']}"
        row = [r["node"], r.get("host"), cpus, gpus, r.get("memory_gib"), r.get("python"),
               r.get("ray")]
        if not quick:
            row += [r.get("bf16"), r.get("torch"), r.get("torchvision"), r.get("ffcv"),
                    r.get("ray.train"), r.get("wandb")]
        if burn_in:
            row += [r.get("fp32_tflops"), r.get("bf16_tflops")]
        rows.append(row)
    print(format_table(headers, rows), flush=True)


if __name__ == "__main__":
    common.main(run)
