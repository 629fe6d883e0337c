"""The configs in cluster/ agree with the code: entrypoints, setup, ports, GPUs, storage."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from pipeline import local_cluster, submit

ROOT = local_cluster.project_root()
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
SHARED = "/mnt/shared"
# GPUs per instance for the machine types the launcher configs may name.
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p5.48xlarge": 8, "g5.48xlarge": 8, "a2-highgpu-8g": 8,
                     "a3-highgpu-8g": 8, "g2-standard-96": 8}


def _load(rel: str) -> dict:
    return yaml.safe_load((CLUSTER / rel).read_text())


def _commands(cfg: dict, *keys: str) -> str:
    return "\n".join(c for k in keys for c in cfg.get(k) or [])


def test_every_yaml_in_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml",
                                       "shared-pvc.yaml"}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_matches_rays_schema(name):
    import jsonschema

    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(_load(name), schema)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_project_with_its_setup_script(name):
    cfg = _load(name)
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local == "."]
    setup = _commands(cfg, "setup_commands")
    assert f"cd {remote} && bash scripts/setup.sh" in setup
    assert (ROOT / "scripts" / "setup.sh").exists()
    for excluded in (".git", ".venv", "stores", "runs"):
        assert excluded in cfg["rsync_exclude"]
    venv_bin = f"{remote}/.venv/bin"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _commands(cfg, key)
        assert f"export PATH={venv_bin}:$PATH" in start, "jobs must run the project's python"
        assert f"{venv_bin}/ray stop" in start


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_dashboard_gpus_and_shared_storage(name):
    cfg = _load(name)
    head = _commands(cfg, "head_start_ray_commands")
    # Reached through `ray dashboard` (an SSH tunnel), never straight from the network.
    assert "--dashboard-port=8265" in head and "--dashboard-host=127.0.0.1" in head
    gpu_types = [t for t, spec in cfg["available_node_types"].items()
                 if spec.get("resources", {}).get("GPU")]
    assert gpu_types, "a GPU worker node type"
    for node_type in gpu_types:
        spec = cfg["available_node_types"][node_type]
        machine = spec["node_config"].get("InstanceType") or spec["node_config"].get("machineType")
        assert spec["resources"]["GPU"] == GPUS_PER_INSTANCE[machine]
        for accel in spec["node_config"].get("guestAccelerators", []):
            assert accel["acceleratorCount"] == spec["resources"]["GPU"]
    assert cfg["head_node_type"] not in gpu_types
    mount = _commands(cfg, "initialization_commands")
    assert re.search(rf"mount -t nfs4? .* {SHARED}\b", mount), "the shared file system is mounted"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"DENSENET_PIPE_HOME={SHARED}" in _commands(cfg, key)
    assert f"mkdir -p {SHARED}/stores {SHARED}/runs" in _commands(cfg, "setup_commands")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_offer_spot_gpu_workers_like_the_on_demand_ones(name):
    """Beside each on-demand GPU type, the same machine at spot / preemptible price, marked
    with a `spot` resource, never the head."""
    types = _load(name)["available_node_types"]
    spot = {t: spec for t, spec in types.items() if spec.get("resources", {}).get("spot")}
    assert spot, "a spot or preemptible worker type"
    machines = {spec["node_config"].get("InstanceType") or spec["node_config"].get("machineType")
                for t, spec in types.items() if t not in spot and spec.get("resources", {}).get("GPU")}
    for node_type, spec in spot.items():
        config = spec["node_config"]
        assert (config.get("InstanceType") or config.get("machineType")) in machines
        if "InstanceType" in config:
            assert config["InstanceMarketOptions"]["MarketType"] == "spot"
        else:
            assert {"preemptible": True} in config["scheduling"]
        assert spec["min_workers"] == 0 and node_type != _load(name)["head_node_type"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_raycluster_image_ports_gpus_and_shared_volume():
    cluster = _load("kuberay/raycluster.yaml")
    pvc = _load("kuberay/shared-pvc.yaml")
    assert cluster["kind"] == "RayCluster" and pvc["kind"] == "PersistentVolumeClaim"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert cluster["spec"]["rayVersion"] == version("ray")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-port"] == "8265"
    ports = {p["name"]: p["containerPort"] for p in _containers(head)[0]["ports"]}
    assert ports["dashboard"] == 8265
    groups = [head, *cluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in _containers(g)}
    assert len(images) == 1, "head and workers run the same image"
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if g["rayStartParams"].get("num-gpus")]
    assert gpu_groups
    for group in gpu_groups:
        limits = _containers(group)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(group["rayStartParams"]["num-gpus"])
    for group in groups:
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in spec["volumes"] if "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
            assert env["DENSENET_PIPE_HOME"] == SHARED
            # The W&B key comes from a secret in the pod, never from the job (submit.job_env).
            assert env["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key",
                                                             "optional": True}}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[SHARED]] == pvc["metadata"]["name"]


def test_dockerfile_installs_with_the_setup_script():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "RUN bash scripts/setup.sh" in text
    assert re.search(r"FROM python:3\.11-slim-bookworm", text), "Debian 12 + 3.11, as setup.sh expects"
    assert "PATH=/app/.venv/bin:$PATH" in text and f"DENSENET_PIPE_HOME={SHARED}" in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "stores", "runs"} <= set(ignored)


def test_rayjob_entrypoint_is_a_real_command_on_the_cluster():
    import typer.main

    from pipeline.cli import app

    job = _load("kuberay/rayjob.yaml")
    cluster = _load("kuberay/raycluster.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    if argv[:2] == ["python", "-m"]:
        module = argv[2]
        assert module.startswith("jobs.") and module[5:] in submit.available_jobs(ROOT)
        return
    assert argv[0] == "densenet-pipe"
    command = typer.main.get_command(app).commands[argv[1]]
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    storage = argv[argv.index("--storage") + 1]
    assert storage.startswith(SHARED + "/")


def test_readme_names_every_config_and_the_address_to_use():
    text = (CLUSTER / "README.md").read_text()
    for rel in ("aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                "kuberay/shared-pvc.yaml", "Dockerfile"):
        assert rel in text, rel
    assert "--address http://127.0.0.1:8265" in text


def test_every_job_entrypoint_is_a_module_with_main():
    for job in submit.available_jobs(ROOT):
        text = (ROOT / "jobs" / f"{job}.py").read_text()
        assert "common.main(run)" in text, job
    assert Path(ROOT / "jobs" / "common.py").exists()


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_start_command_runs_ray_with_token_auth(name):
    cfg = _load(name)
    token_file = next(r for r, local in cfg["file_mounts"].items()
                      if local == "~/.config/densenet-pipe/ray-token")
    assert f"chmod 600 {token_file}" in _commands(cfg, "setup_commands")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cfg[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        before_start = command.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in before_start and f"RAY_AUTH_TOKEN_PATH={token_file}" in before_start


def test_every_kuberay_pod_runs_with_token_auth_behind_a_network_policy():
    cluster = _load("kuberay/raycluster.yaml")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN itself; nothing may turn it off per pod.
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        for container in _containers(group):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token"
    job = _load("kuberay/rayjob.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    policy = _load("kuberay/networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    own = {"ray.io/cluster": cluster["metadata"]["name"]}
    assert policy["spec"]["podSelector"]["matchLabels"] == own
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": own}}]}]


def test_the_token_goes_only_over_https_or_to_this_machine(monkeypatch, tmp_path, cli):
    from pipeline.errors import UserError

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", submit.PLAIN_HTTP_ENV):
        monkeypatch.delenv(var, raising=False)
    assert submit._remote_headers("http://10.0.0.5:8265") == {}
    r = cli("cluster", "token")
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip())
    assert path == submit.user_token_file() and path.stat().st_mode & 0o777 == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    assert cli("cluster", "token").exit_code == 0 and path.read_text().strip() == token
    assert submit._remote_headers("https://head.example:8265") == {"Authorization": f"Bearer {token}"}
    assert submit._remote_headers("http://127.0.0.1:8265") == {"Authorization": f"Bearer {token}"}
    with pytest.raises(UserError, match="refusing to send the cluster's token over plain http to 10.0.0.5"):
        submit._remote_headers("http://10.0.0.5:8265")
    r = cli("jobs", "list", "--address", "http://10.0.0.5:8265")
    assert r.exit_code == 2 and "plain http" in r.stderr and "Traceback" not in r.output
    monkeypatch.setenv(submit.PLAIN_HTTP_ENV, "1")
    assert submit._remote_headers("http://10.0.0.5:8265")["Authorization"] == f"Bearer {token}"
