"""Offline checks of the cluster definitions in clusters/: they parse, the two Ray cluster launcher configs
validate against the JSON schema shipped in the ray package (and Ray's own validate_config), and
hand-written rules hold: node types, GPUs, elastic min/max, pinned images, nothing that exposes the
dashboard / GCS / client ports, the package gets installed, KubeRay manifests are sane. Every rule family
also has a test that breaks a copy of a config in memory and expects the checker to name the problem.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusters.check import (  # the rules under test and the constants they share
    CLUSTERS,
    KUBERAY_FILES,
    LAUNCHER_FILES,
    RAY_VERSION,
    REPO,
    RUNTIME_ENV_FILE,
    _header,
    _load,
    _load_all,
    exposure_errors,
    header_errors,
    kuberay_errors,
    launcher_errors,
)


def test_expected_files_exist() -> None:
    names = {p.name for p in CLUSTERS.glob("*.yaml")}
    assert set(LAUNCHER_FILES) | set(KUBERAY_FILES) | {RUNTIME_ENV_FILE} <= names
    readme = (CLUSTERS / "README.md").read_text()
    for name in sorted(names):
        assert name in readme, f"clusters/README.md does not mention {name}"


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), path
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_matches_ray_schema(name: str, ray_schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_load(name), ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_validate_config(name: str) -> None:
    """What `ray up` does before it contacts the cloud: merge the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_load(name))
    validate_config(prepared)
    assert prepared["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_rules(name: str) -> None:
    m = re.search(r"rso_ray\.train[^\n]*?--workers\s+(\d+):(\d+)", _header(name))
    assert m, f"{name}: the header's train command has no --workers MIN:MAX"
    assert launcher_errors(_load(name), (int(m.group(1)), int(m.group(2)))) == []


def test_launcher_providers() -> None:
    aws, gcp = _load("aws-gpu.yaml"), _load("gcp-gpu.yaml")
    assert aws["provider"]["type"] == "aws"
    assert all("IamInstanceProfile" in t["node_config"] for t in aws["available_node_types"].values())
    assert gcp["provider"]["type"] == "gcp" and gcp["provider"]["project_id"] and gcp["provider"]["availability_zone"]
    for name, node_type in gcp["available_node_types"].items():
        if name != gcp["head_node_type"]:
            assert node_type["node_config"]["serviceAccounts"], name
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name


@pytest.mark.parametrize("name", [*LAUNCHER_FILES, *KUBERAY_FILES, RUNTIME_ENV_FILE])
def test_headers(name: str) -> None:
    assert header_errors(name) == []


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifests(name: str) -> None:
    assert kuberay_errors(_load_all(name)) == []


def test_kuberay_cluster_specs_agree() -> None:
    """The RayJob brings up the same cluster as the standalone RayCluster."""
    (cluster,) = _load_all("kuberay-raycluster.yaml")
    (job,) = _load_all("kuberay-rayjob.yaml")
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]


def _pyproject_requirements() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d for d in deps if not d.startswith("ray[")}


@pytest.mark.parametrize("where", ["runtime-env.yaml", "kuberay-rayjob.yaml"])
def test_runtime_envs_are_valid_and_cover_dependencies(where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    if where == RUNTIME_ENV_FILE:
        env = _load(RUNTIME_ENV_FILE)
    else:
        env = yaml.safe_load(_load_all(where)[0]["spec"]["runtimeEnvYAML"])
    parsed = RuntimeEnv(**env)  # Ray's own validation of pip / working_dir
    packages = set(parsed["pip"]["packages"])
    assert _pyproject_requirements() <= packages, _pyproject_requirements() - packages


# ---------------------------------------------------------------------------------------------------------
# Broken copies: every rule family reports what is wrong.
# ---------------------------------------------------------------------------------------------------------


def _aws() -> dict[str, Any]:
    return copy.deepcopy(_load("aws-gpu.yaml"))


def _gcp() -> dict[str, Any]:
    return copy.deepcopy(_load("gcp-gpu.yaml"))


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    return next(t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"])


def _head(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _sg_rules(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return cfg["provider"].setdefault("security_group", {}).setdefault("IpPermissions", [])


def _set(cfg: dict[str, Any], fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    fn(cfg)
    return cfg


LAUNCHER_BREAKS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "head type missing": (lambda: _set(_aws(), lambda c: c.pop("head_node_type")), r"head_node_type None is not one of"),
    "head type unknown": (
        lambda: _set(_gcp(), lambda c: c.update(head_node_type="head_gpu")),
        r"head_node_type 'head_gpu' is not one of available_node_types",
    ),
    "min > max": (lambda: _set(_aws(), lambda c: _worker(c).update(min_workers=9)), r"min_workers 9 > max_workers 8"),
    "type without max": (lambda: _set(_gcp(), lambda c: _worker(c).pop("max_workers")), r"no max_workers"),
    "sum of maxima": (
        lambda: _set(_aws(), lambda c: c.update(max_workers=6)),
        r"sum of node-type max_workers \(10\) exceeds the top-level max_workers \(6\)",
    ),
    "worker without GPU": (
        lambda: _set(_aws(), lambda c: _worker(c).update(resources={"CPU": 8})),
        r"worker node type gpu_1x_a10g declares no GPU",
    ),
    "GPU count vs accelerators": (
        lambda: _set(_gcp(), lambda c: _worker(c).update(resources={"CPU": 8, "GPU": 2})),
        r"resources GPU 2 != 1 guestAccelerators",
    ),
    "head with GPU resources": (
        lambda: _set(_aws(), lambda c: _head(c).update(resources={"CPU": 8, "GPU": 1})),
        r"head node type head_cpu has GPUs",
    ),
    "head on a GPU instance": (
        lambda: _set(_aws(), lambda c: _head(c)["node_config"].update(InstanceType="g5.xlarge")),
        r"head node type head_cpu has GPUs .*g5\.xlarge",
    ),
    "head with accelerators": (
        lambda: _set(
            _gcp(),
            lambda c: _head(c)["node_config"].update(
                guestAccelerators=[{"acceleratorType": "nvidia-l4", "acceleratorCount": 1}]
            ),
        ),
        r"head node type head_cpu has GPUs .*n2-standard-8 with guestAccelerators",
    ),
    "image ray-ml": (
        lambda: _set(_aws(), lambda c: c["docker"].update(image=f"rayproject/ray-ml:{RAY_VERSION}-py311-gpu")),
        r"docker\.image: image rayproject/ray-ml.* no longer published",
    ),
    "image latest": (
        lambda: _set(_gcp(), lambda c: c["docker"].update(image="rayproject/ray:latest-gpu")),
        r"not pinned to Ray .*'latest-gpu'",
    ),
    "image untagged": (
        lambda: _set(_gcp(), lambda c: c["docker"].update(image="rayproject/ray")),
        r"not pinned to Ray .*'none'",
    ),
    "image other version": (
        lambda: _set(_aws(), lambda c: c["docker"].update(image="rayproject/ray:2.6.0-py311-gpu")),
        r"not pinned to Ray",
    ),
    "worker image ray-ml": (
        lambda: _set(_aws(), lambda c: _worker(c).update(docker={"worker_image": "rayproject/ray-ml:latest-gpu"})),
        r"gpu_1x_a10g\.docker\.worker_image: image rayproject/ray-ml",
    ),
    "no docker": (lambda: _set(_gcp(), lambda c: c.pop("docker")), r"docker: no image"),
    "dashboard to the world": (
        lambda: _set(
            _aws(),
            lambda c: _sg_rules(c).append(
                {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
            ),
        ),
        r"IpPermissions\[0\]: exposes port 8265 \(dashboard\) to 0\.0\.0\.0/0",
    ),
    "all traffic to the world": (
        lambda: _set(_aws(), lambda c: _sg_rules(c).append({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})),
        r"exposes port 6379 \(GCS\) to 0\.0\.0\.0/0",
    ),
    "port range over IPv6": (
        lambda: _set(
            _aws(),
            lambda c: _sg_rules(c).append(
                {"IpProtocol": "tcp", "FromPort": 10000, "ToPort": 10100, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
            ),
        ),
        r"exposes port 10001 \(Ray client\) to ::/0",
    ),
    "GCP firewall rule": (
        lambda: _set(
            _gcp(),
            lambda c: c.setdefault("metadata", {}).update(
                firewall={"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22", "6000-7000"]}]}
            ),
        ),
        r"metadata\.firewall: exposes port 6379 \(GCS\) to 0\.0\.0\.0/0",
    ),
    "no package install": (
        lambda: _set(_aws(), lambda c: c.update(setup_commands=['pip install -q "torch>=2.4"'])),
        r"node type head_cpu: no setup command installs the rso_ray package",
    ),
    "no torch": (
        lambda: _set(_gcp(), lambda c: c.update(setup_commands=["pip install -q /home/ray/rso_ray_src"])),
        r"no setup command installs torch",
    ),
    "type-specific setup drops the package": (
        lambda: _set(_aws(), lambda c: _worker(c).update(worker_setup_commands=["pip install torch"])),
        r"node type gpu_1x_a10g: no setup command installs the rso_ray package",
    ),
    "package source not mounted": (
        lambda: _set(_gcp(), lambda c: c.update(file_mounts={})),
        r"installs rso_ray from /home/ray/rso_ray_src, which no file_mounts entry provides",
    ),
    "mount of a folder without pyproject": (
        lambda: _set(_aws(), lambda c: c.update(file_mounts={"/home/ray/rso_ray_src": "./clusters"})),
        r"\./clusters \(from the repository root\) has no pyproject\.toml",
    ),
}


@pytest.mark.parametrize("case", sorted(LAUNCHER_BREAKS))
def test_launcher_checker_reports_broken_copy(case: str) -> None:
    build, message = LAUNCHER_BREAKS[case]
    errors = launcher_errors(build())
    assert any(re.search(message, e) for e in errors), errors


def test_launcher_checker_reports_too_few_gpus_for_elastic_min() -> None:
    cfg = _set(_aws(), lambda c: _worker(c).update(min_workers=0))
    errors = launcher_errors(cfg, (2, 8))
    assert any(re.search(r"GPUs at min_workers \(0\) are fewer than MIN of --workers 2:8", e) for e in errors), errors
    cfg = _set(_gcp(), lambda c: [t.update(max_workers=1) for t in c["available_node_types"].values()])
    errors = launcher_errors(cfg, (2, 32))
    assert any(re.search(r"GPUs at max_workers \(9\) are fewer than MAX of --workers 2:32", e) for e in errors), errors


def test_exposure_checker_allows_ssh_and_private_ranges() -> None:
    cfg = _aws()
    _sg_rules(cfg).extend(
        [
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-123"}]},
        ]
    )
    assert exposure_errors(cfg) == []


def test_ray_schema_rejects_broken_copies(ray_schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for cfg, message in [
        (_set(_aws(), lambda c: c.update(head_node={"InstanceType": "m5.large"}, min_workers=1)), r"Additional properties"),
        (_set(_gcp(), lambda c: _worker(c).update(resources={"GPU": 0.5})), r"0\.5 is not of type 'integer'"),
        (_set(_aws(), lambda c: c.pop("provider")), r"'provider' is a required property"),
        (_set(_gcp(), lambda c: _worker(c).pop("node_config")), r"'node_config' is a required property"),
    ]:
        with pytest.raises(jsonschema.ValidationError, match=message):
            jsonschema.validate(cfg, ray_schema)


def test_ray_validate_config_rejects_unknown_head_type() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _set(_gcp(), lambda c: c.update(head_node_type="head_gpu"))
    with pytest.raises(ValueError, match=r"`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(cfg))


def _job() -> dict[str, Any]:
    return copy.deepcopy(_load_all("kuberay-rayjob.yaml")[0])


def _cluster() -> dict[str, Any]:
    return copy.deepcopy(_load_all("kuberay-raycluster.yaml")[0])


def _job_workers(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


def _job_head(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["headGroupSpec"]


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def _entrypoint(doc: dict[str, Any], old: str, new: str) -> None:
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(old, new)


KUBERAY_BREAKS: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "old apiVersion": (
        lambda: _set(_cluster(), lambda d: d.update(apiVersion="ray.io/v1alpha1")),
        r"apiVersion 'ray.io/v1alpha1' is not ray.io/v1",
    ),
    "other kind": (lambda: _set(_job(), lambda d: d.update(kind="RayService")), r"unexpected kind 'RayService'"),
    "rayVersion mismatch": (
        lambda: _set(_cluster(), lambda d: d["spec"].update(rayVersion="2.59.0")),
        r"rayVersion 2\.59\.0 does not match the image rayproject/ray:2\.60\.0",
    ),
    "image ray-ml": (
        lambda: _set(_job(), lambda d: _container(_job_workers(d)).update(image="rayproject/ray-ml:2.60.0-gpu")),
        r"container ray-worker: image rayproject/ray-ml.* no longer published",
    ),
    "image latest": (
        lambda: _set(_cluster(), lambda d: _container(_job_head(d)).update(image="rayproject/ray:latest")),
        r"container ray-head: image rayproject/ray:latest is not pinned",
    ),
    "LoadBalancer head": (
        lambda: _set(_cluster(), lambda d: _job_head(d).update(serviceType="LoadBalancer")),
        r"headGroupSpec\.serviceType: LoadBalancer service exposes the Ray head",
    ),
    "NodePort head service": (
        lambda: _set(_job(), lambda d: _job_head(d).update(headService={"spec": {"type": "NodePort"}})),
        r"headService\.spec\.type: NodePort service exposes the Ray head",
    ),
    "dashboard on a host port": (
        lambda: _set(_cluster(), lambda d: _container(_job_head(d))["ports"][1].update(hostPort=8265)),
        r"hostPort: publishes port 8265",
    ),
    "worker without GPU": (
        lambda: _set(
            _job(), lambda d: _container(_job_workers(d)).update(resources={"limits": {"cpu": "7", "memory": "28Gi"}})
        ),
        r"worker group gpu-1x requests no nvidia.com/gpu",
    ),
    "head with GPU": (
        lambda: _set(_cluster(), lambda d: _container(_job_head(d))["resources"]["limits"].update({"nvidia.com/gpu": 1})),
        r"the head group requests nvidia.com/gpu",
    ),
    "min > max replicas": (
        lambda: _set(_cluster(), lambda d: _job_workers(d).update(minReplicas=9)),
        r"worker group gpu-1x: minReplicas 9 > maxReplicas 8",
    ),
    "no autoscaling": (
        lambda: _set(_job(), lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False)),
        r"enableInTreeAutoscaling is not true",
    ),
    "entrypoint not rso_ray.train": (
        lambda: _set(_job(), lambda d: d["spec"].update(entrypoint="python train.py --storage-path s3://b/r")),
        r"does not run `python -m rso_ray.train`",
    ),
    "local storage path": (
        lambda: _set(_job(), lambda d: _entrypoint(d, "s3://BUCKET/rso_runs", "/tmp/rso_runs")),
        r"--storage-path /tmp/rso_runs is not shared storage",
    ),
    "cluster outlives the job": (
        lambda: _set(_job(), lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
        r"shutdownAfterJobFinishes is not true",
    ),
    "fewer GPUs than MIN": (
        lambda: _set(_job(), lambda d: _job_workers(d).update(minReplicas=1, replicas=1)),
        r"GPUs at minReplicas \(1\) are fewer than MIN of --workers 2:8",
    ),
    "no code in the runtime env": (
        lambda: _set(_job(), lambda d: d["spec"].update(runtimeEnvYAML="pip: [torch]")),
        r"ships no rso_ray code",
    ),
}


@pytest.mark.parametrize("case", sorted(KUBERAY_BREAKS))
def test_kuberay_checker_reports_broken_copy(case: str) -> None:
    build, message = KUBERAY_BREAKS[case]
    errors = kuberay_errors([build()])
    assert any(re.search(message, e) for e in errors), errors


def test_kuberay_checker_accepts_storage_on_a_shared_volume() -> None:
    job = _job()
    _entrypoint(job, "s3://BUCKET/rso_runs", "/mnt/rso_runs/runs")
    for group in (_job_head(job), _job_workers(job)):
        group["template"]["spec"]["volumes"].append({"name": "runs", "persistentVolumeClaim": {"claimName": "rso-runs"}})
        _container(group)["volumeMounts"].append({"name": "runs", "mountPath": "/mnt/rso_runs"})
    assert kuberay_errors([job]) == []
    # Mounted on the workers only: the driver on the head could not see the checkpoints.
    _container(_job_head(job))["volumeMounts"].pop()
    assert any("is not shared storage" in e for e in kuberay_errors([job]))


def test_header_checker_reports_broken_copy(tmp_path: Path) -> None:
    text = (CLUSTERS / "gcp-gpu.yaml").read_text().replace("project_id: YOUR_PROJECT_ID", "project_id: YOUR_OTHER_ID")
    text = text.replace("ray down clusters/gcp-gpu.yaml", "ray stop")
    text = text.replace("--storage-path gs://BUCKET/rso_runs", "--storage-path ./rso_runs")
    text = text.replace("python -m rso_ray.tune", "python -m rso_ray.sweep")
    (tmp_path / "gcp-gpu.yaml").write_text(text)
    errors = header_errors("gcp-gpu.yaml", tmp_path)
    assert any("header's --storage-path ./rso_runs is not shared storage" in e for e in errors), errors
    assert any("lacks a `ray job submit ... python -m rso_ray.tune` command" in e for e in errors), errors
    assert any("placeholder YOUR_OTHER_ID is not explained" in e for e in errors), errors
    assert any("lacks `ray down clusters/gcp-gpu.yaml`" in e for e in errors), errors
