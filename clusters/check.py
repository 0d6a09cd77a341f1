"""Offline checks of the cluster definitions in this folder, the rules that the tests (tests/test_clusters.py)
and a person editing a cluster file both run: the files parse, the Ray cluster launcher configs name GPU
node types with enough GPUs for the elastic minimum, images are pinned to the Ray version of pyproject.toml,
nothing exposes the dashboard / GCS / client ports to the world, the package gets installed, KubeRay
manifests are sane, and each file's header names its commands and placeholders. Each ``*_errors`` function
returns the problems it finds, each naming the file and the rule.

    python -m clusters.check            # from the repository root: every file, exit status 1 on a problem
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]  # clusters/ sits in the repository root
CLUSTERS = REPO / "clusters"
LAUNCHER_FILES = ("aws-gpu.yaml", "gcp-gpu.yaml")
KUBERAY_FILES = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
RUNTIME_ENV_FILE = "runtime-env.yaml"
SENSITIVE_PORTS = {8265: "dashboard", 6379: "GCS", 10001: "Ray client"}
WORLD = ("0.0.0.0/0", "::/0")
ALL_PORTS = (0, 65535)
# Instance / machine type families that come with GPUs.
AWS_GPU_FAMILIES = ("g3", "g4", "g5", "g6", "g7", "p2", "p3", "p4", "p5", "p6")
GCP_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")


def _ray_pin() -> str:
    """The Ray version pyproject.toml pins (ray[...]==X)."""
    m = re.search(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', (REPO / "pyproject.toml").read_text())
    if m is None:
        raise ValueError("pyproject.toml pins no ray version")
    return m.group(1)


RAY_VERSION = _ray_pin()


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _load_all(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d is not None]


def _header(name: str, folder: Path = CLUSTERS) -> str:
    """The comment block at the top of a file."""
    lines = []
    for line in (folder / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _walk(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------------------
# Checkers: each returns a list of problems (empty when the config is fine).
# ---------------------------------------------------------------------------------------------------------


def image_errors(image: Any, where: str) -> list[str]:
    if not isinstance(image, str) or not image:
        return [f"{where}: no container image"]
    errors = []
    if "ray-ml" in image:
        errors.append(f"{where}: image {image} is rayproject/ray-ml, which is no longer published; use rayproject/ray")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not tag or tag.startswith(("latest", "nightly")) or not re.match(rf"{re.escape(RAY_VERSION)}(\D|$)", tag):
        errors.append(f"{where}: image {image} is not pinned to Ray {RAY_VERSION} (tag {tag or 'none'!r})")
    return errors


def _port_ranges(spec: Any) -> list[tuple[int, int]]:
    """GCP-style port list: ["22", "6000-7000"]."""
    out = []
    for item in spec:
        lo, _, hi = str(item).partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def _exposed(ranges: list[tuple[int, int]]) -> list[int]:
    return [p for p in SENSITIVE_PORTS if any(lo <= p <= hi for lo, hi in ranges)]


def exposure_errors(doc: Any) -> list[str]:
    """Ingress rules anywhere in the document (AWS security-group IpPermissions, GCP firewall rules,
    Kubernetes services / host ports / ingresses) that open the dashboard, GCS or client port to the world."""
    errors = []
    for path, node in _walk(doc):
        if not isinstance(node, dict):
            continue
        # AWS security group rule.
        if "IpProtocol" in node or "FromPort" in node or "ToPort" in node:
            cidrs = [r.get("CidrIp") for r in node.get("IpRanges") or []]
            cidrs += [r.get("CidrIpv6") for r in node.get("Ipv6Ranges") or []]
            world = [c for c in cidrs if c in WORLD]
            proto = str(node.get("IpProtocol", "tcp")).lower()
            if world and proto not in ("icmp", "icmpv6", "1", "58"):
                lo, hi = node.get("FromPort"), node.get("ToPort")
                if proto in ("-1", "all") or lo in (None, -1):
                    ranges = [ALL_PORTS]
                else:
                    ranges = [(int(lo), int(hi) if hi not in (None, -1) else int(lo))]
                for port in _exposed(ranges):
                    errors.append(f"{path}: exposes port {port} ({SENSITIVE_PORTS[port]}) to {world[0]}")
        # GCP firewall rule.
        if "sourceRanges" in node or "source_ranges" in node:
            world = [c for c in node.get("sourceRanges") or node.get("source_ranges") or [] if c in WORLD]
            for allowed in node.get("allowed") or node.get("allow") or []:
                proto = str(allowed.get("IPProtocol", allowed.get("protocol", "all"))).lower()
                if not world or proto in ("icmp", "icmpv6"):
                    continue
                ranges = _port_ranges(allowed["ports"]) if allowed.get("ports") else [ALL_PORTS]
                for port in _exposed(ranges):
                    errors.append(f"{path}: exposes port {port} ({SENSITIVE_PORTS[port]}) to {world[0]}")
        # Kubernetes: a Service (or KubeRay's headGroupSpec.serviceType) reachable from outside the cluster.
        for key in ("serviceType", "type"):
            if node.get(key) in ("LoadBalancer", "NodePort"):
                errors.append(f"{path}.{key}: {node[key]} service exposes the Ray head outside the cluster")
        if node.get("hostNetwork") is True:
            errors.append(f"{path}.hostNetwork: pods on the host network expose the Ray ports on the node's IP")
        if node.get("hostPort") in SENSITIVE_PORTS or (
            "hostPort" in node and node.get("containerPort") in SENSITIVE_PORTS
        ):
            errors.append(
                f"{path}.hostPort: publishes port {node.get('hostPort')} (container port {node.get('containerPort')}) "
                "on the node's IP"
            )
        if node.get("kind") in ("Ingress", "Route", "Gateway"):
            errors.append(f"{path}: a {node['kind']} routes outside traffic into the cluster")
    return errors


def _type_gpus(node_type: dict[str, Any]) -> int:
    """GPUs a launcher node type declares: resources.GPU, else its accelerator config."""
    resources = node_type.get("resources") or {}
    if "GPU" in resources:
        return int(resources["GPU"])
    config = node_type.get("node_config") or {}
    return sum(int(a.get("acceleratorCount", 1)) for a in config.get("guestAccelerators") or [])


def _gpu_machine(node_type: dict[str, Any]) -> str | None:
    config = node_type.get("node_config") or {}
    aws = str(config.get("InstanceType", ""))
    gcp = str(config.get("machineType", "")).rsplit("/", 1)[-1]
    if aws.startswith(AWS_GPU_FAMILIES):
        return aws
    if config.get("guestAccelerators"):
        return f"{gcp} with guestAccelerators"
    if gcp.startswith(GCP_GPU_FAMILIES):
        return gcp
    return None


_PIP_RSO = re.compile(r"pip install\b[^;&|\n]*?(\S*rso[-_]ray\S*)")
_PIP_TORCH = re.compile(r"pip install\b[^;&|\n]*\btorch\b")


def _effective_setup_commands(cfg: dict[str, Any]) -> dict[str, list[str]]:
    """Setup commands each node type runs: the head runs setup + head_setup; a worker type runs its own
    worker_setup_commands when it has them (they replace the global ones), else setup + worker_setup."""
    common = list(cfg.get("setup_commands") or [])
    out = {}
    for name, node_type in (cfg.get("available_node_types") or {}).items():
        if name == cfg.get("head_node_type"):
            out[name] = common + list(cfg.get("head_setup_commands") or [])
        elif "worker_setup_commands" in node_type:
            out[name] = list(node_type["worker_setup_commands"] or [])
        else:
            out[name] = common + list(cfg.get("worker_setup_commands") or [])
    return out


def install_errors(cfg: dict[str, Any], repo: Path = REPO) -> list[str]:
    """Every node installs torch and rso_ray; a local source must come from a file mount of this repo."""
    errors = []
    mounts = cfg.get("file_mounts") or {}
    for name, commands in _effective_setup_commands(cfg).items():
        text = "\n".join(commands)
        if not _PIP_TORCH.search(text):
            errors.append(f"node type {name}: no setup command installs torch")
        m = _PIP_RSO.search(text)
        if not m:
            errors.append(f"node type {name}: no setup command installs the rso_ray package")
            continue
        target = m.group(1).strip("'\"")
        if target.startswith(("/", "~")):
            mount = next((r for r in mounts if target.rstrip("/") == r.rstrip("/")), None)
            if mount is None:
                errors.append(f"node type {name}: installs rso_ray from {target}, which no file_mounts entry provides")
            elif not (repo / mounts[mount] / "pyproject.toml").is_file():
                errors.append(f"file_mounts {mount}: {mounts[mount]} (from the repository root) has no pyproject.toml")
    return list(dict.fromkeys(errors))


def launcher_errors(cfg: dict[str, Any], workers: tuple[int, int] | None = None) -> list[str]:
    """Cross-field rules of a Ray cluster launcher config; ``workers`` is the (MIN, MAX) of the
    `--workers MIN:MAX` the config is meant for."""
    errors = []
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if not types:
        return ["no available_node_types"]
    if head not in types:
        errors.append(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    top = cfg.get("max_workers")
    if not isinstance(top, int):
        errors.append("no top-level max_workers")
        top = 0
    sum_min = sum_max = 0
    gpus_at_min = gpus_at_max = 0
    for name, node_type in types.items():
        lo = node_type.get("min_workers", 0)
        if "max_workers" not in node_type and name != head:
            errors.append(f"node type {name}: no max_workers")
        hi = node_type.get("max_workers", 0 if name == head else top)
        if lo > hi:
            errors.append(f"node type {name}: min_workers {lo} > max_workers {hi}")
        sum_min, sum_max = sum_min + lo, sum_max + hi
        gpus = _type_gpus(node_type)
        accelerators = sum(
            int(a.get("acceleratorCount", 1)) for a in (node_type.get("node_config") or {}).get("guestAccelerators") or []
        )
        if name == head:
            machine = _gpu_machine(node_type)
            if gpus > 0 or machine:
                errors.append(
                    f"head node type {name} has GPUs (resources GPU {gpus}, machine {machine}); "
                    "training workers could be placed on the head"
                )
            continue
        if int((node_type.get("resources") or {}).get("GPU", 0)) < 1:
            errors.append(f"worker node type {name} declares no GPU in resources (Ray Train runs one worker per GPU)")
        if accelerators and gpus != accelerators:
            errors.append(f"worker node type {name}: resources GPU {gpus} != {accelerators} guestAccelerators")
        gpus_at_min += gpus * lo
        gpus_at_max += gpus * hi
    if sum_max > top:
        errors.append(f"sum of node-type max_workers ({sum_max}) exceeds the top-level max_workers ({top})")
    if sum_min > top:
        errors.append(f"sum of node-type min_workers ({sum_min}) exceeds the top-level max_workers ({top})")
    if workers is not None:
        lo, hi = workers
        if gpus_at_min < lo:
            errors.append(
                f"GPUs at min_workers ({gpus_at_min}) are fewer than MIN of --workers {lo}:{hi}: "
                "rso_ray.train needs MIN GPUs when the job starts"
            )
        if gpus_at_max < hi:
            errors.append(f"GPUs at max_workers ({gpus_at_max}) are fewer than MAX of --workers {lo}:{hi}")
    docker = cfg.get("docker") or {}
    images = {f"docker.{k}": docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    for name, node_type in types.items():
        if "worker_image" in (node_type.get("docker") or {}):
            images[f"available_node_types.{name}.docker.worker_image"] = node_type["docker"]["worker_image"]
    if "image" not in docker and not ("head_image" in docker and "worker_image" in docker):
        errors.append("docker: no image (nodes must run the pinned rayproject/ray image)")
    for where, image in images.items():
        errors += image_errors(image, where)
    errors += exposure_errors(cfg)
    errors += install_errors(cfg)
    return errors


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("head", spec.get("headGroupSpec") or {})]
    out += [(g.get("groupName", f"#{i}"), g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    return out


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return list(((group.get("template") or {}).get("spec") or {}).get("containers") or [])


def _group_gpus(group: dict[str, Any]) -> int:
    total = 0
    for c in _containers(group):
        res = c.get("resources") or {}
        total += int((res.get("limits") or {}).get("nvidia.com/gpu", (res.get("requests") or {}).get("nvidia.com/gpu", 0)))
    return total


def _pvc_mounts(group: dict[str, Any]) -> set[str]:
    spec = (group.get("template") or {}).get("spec") or {}
    claims = {v["name"] for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v}
    return {m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts") or [] if m.get("name") in claims}


def ray_cluster_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    errors = []
    version = str(spec.get("rayVersion", ""))
    if version != RAY_VERSION:
        errors.append(f"{where}: rayVersion {version!r} is not the project's Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}: enableInTreeAutoscaling is not true (elastic training needs the autoscaler)")
    groups = _groups(spec)
    if len(groups) < 2:
        errors.append(f"{where}: no workerGroupSpecs")
    for name, group in groups:
        containers = _containers(group)
        if not containers:
            errors.append(f"{where}: group {name} has no containers")
        for c in containers:
            image = c.get("image")
            errors += image_errors(image, f"{where}: group {name} container {c.get('name')}")
            tag = str(image).rsplit("/", 1)[-1].partition(":")[2]
            if version and not tag.startswith(version):
                errors.append(f"{where}: rayVersion {version} does not match the image {image} of group {name}")
    head = spec.get("headGroupSpec") or {}
    if _group_gpus(head) > 0:
        errors.append(f"{where}: the head group requests nvidia.com/gpu; training workers could be placed on the head")
    if str((head.get("rayStartParams") or {}).get("num-gpus", "0")) != "0":
        errors.append(f"{where}: the head's rayStartParams num-gpus is not 0")
    for name, group in groups[1:]:
        if _group_gpus(group) < 1:
            errors.append(f"{where}: worker group {name} requests no nvidia.com/gpu")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas")
        if hi is None:
            errors.append(f"{where}: worker group {name} has no maxReplicas")
            continue
        if lo > hi:
            errors.append(f"{where}: worker group {name}: minReplicas {lo} > maxReplicas {hi}")
        replicas = group.get("replicas", lo)
        if not lo <= replicas <= hi:
            errors.append(f"{where}: worker group {name}: replicas {replicas} outside [minReplicas, maxReplicas]")
    return errors


_WORKERS = re.compile(r"--workers\s+(\d+):(\d+)")
_STORAGE = re.compile(r"--storage-path\s+(\S+)")
# In prose: only values that look like a URI or a path.
_STORAGE_IN_TEXT = re.compile(r"--storage-path\s+((?:[a-z][a-z0-9+.-]*://|/|\./|~)\S*)")
# Which `ray job submit ... python -m MODULE` commands each header shows.
HEADER_COMMANDS = {
    "aws-gpu.yaml": ("rso_ray.train", "rso_ray.tune"),
    "gcp-gpu.yaml": ("rso_ray.train", "rso_ray.tune"),
    "kuberay-raycluster.yaml": ("rso_ray.train", "rso_ray.tune"),
    "kuberay-rayjob.yaml": (),  # its entrypoint is in the manifest
    "runtime-env.yaml": ("rso_ray.train",),
}


def rayjob_errors(job: dict[str, Any]) -> list[str]:
    spec = job.get("spec") or {}
    errors = []
    entrypoint = str(spec.get("entrypoint", ""))
    if "python -m rso_ray.train" not in entrypoint:
        errors.append(f"RayJob entrypoint does not run `python -m rso_ray.train`: {entrypoint!r}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        errors.append("RayJob: shutdownAfterJobFinishes is not true (the GPU cluster would outlive the job)")
    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return [*errors, "RayJob has no rayClusterSpec"]
    groups = _groups(cluster)
    storage = _STORAGE.search(entrypoint)
    if storage is None:
        errors.append("RayJob entrypoint has no --storage-path (checkpoints would stay on the pods)")
    else:
        path = storage.group(1)
        shared = path.startswith(("s3://", "gs://", "gcs://", "abfs://"))
        if not shared and path.startswith("/"):
            shared = all(any(path.startswith(m.rstrip("/") + "/") or path == m for m in _pvc_mounts(g)) for _, g in groups)
        if not shared:
            errors.append(
                f"RayJob --storage-path {path} is not shared storage (use s3:// / gs:// or a PVC mounted in every group)"
            )
    workers = _WORKERS.search(entrypoint)
    if workers:
        lo, hi = int(workers.group(1)), int(workers.group(2))
        at_min = sum(_group_gpus(g) * g.get("minReplicas", 0) for _, g in groups[1:])
        at_max = sum(_group_gpus(g) * g.get("maxReplicas", 0) for _, g in groups[1:])
        if at_min < lo:
            errors.append(f"GPUs at minReplicas ({at_min}) are fewer than MIN of --workers {lo}:{hi}")
        if at_max < hi:
            errors.append(f"GPUs at maxReplicas ({at_max}) are fewer than MAX of --workers {lo}:{hi}")
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    pip = env.get("pip") or []
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    if "working_dir" not in env and not any(re.search(r"rso[-_]ray", str(p)) for p in packages):
        errors.append("RayJob runtimeEnvYAML ships no rso_ray code (working_dir or a pip entry)")
    return errors


def kuberay_errors(docs: list[Any]) -> list[str]:
    errors = []
    if not docs:
        return ["no documents"]
    for i, doc in enumerate(docs):
        kind, api = doc.get("kind"), doc.get("apiVersion")
        where = f"document {i} ({kind})"
        if kind not in ("RayCluster", "RayJob"):
            errors.append(f"{where}: unexpected kind {kind!r} (RayCluster or RayJob)")
            continue
        if api != "ray.io/v1":
            errors.append(f"{where}: apiVersion {api!r} is not ray.io/v1")
        if kind == "RayCluster":
            errors += ray_cluster_spec_errors(doc.get("spec") or {}, where)
        else:
            errors += rayjob_errors(doc)
            if isinstance((doc.get("spec") or {}).get("rayClusterSpec"), dict):
                errors += ray_cluster_spec_errors(doc["spec"]["rayClusterSpec"], f"{where}.rayClusterSpec")
        errors += exposure_errors(doc)
    return errors


def header_errors(name: str, folder: Path = CLUSTERS) -> list[str]:
    """The header comment names the commands, a shared --storage-path and every YOUR_* placeholder."""
    header, path = _header(name, folder), f"clusters/{name}"
    errors = []
    if name in LAUNCHER_FILES:
        for command in (f"ray up {path}", f"ray dashboard {path}", f"ray down {path}"):
            if command not in header:
                errors.append(f"{name}: header lacks `{command}`")
    for module in HEADER_COMMANDS.get(name, ()):
        if not re.search(rf"ray job submit --address http://localhost:8265 [^\n]*\\\n#\s+python -m {module}\b", header):
            errors.append(f"{name}: header lacks a `ray job submit ... python -m {module}` command")
    if name in KUBERAY_FILES and "kubectl port-forward" not in header:
        errors.append(f"{name}: header lacks the `kubectl port-forward` to reach the dashboard")
    for storage in _STORAGE_IN_TEXT.findall(header):
        if not storage.startswith(("s3://", "gs://")):
            errors.append(f"{name}: header's --storage-path {storage} is not shared storage")
    lines = (folder / name).read_text().splitlines()
    body = "\n".join(line.split(" #", 1)[0] for line in lines if not line.lstrip().startswith("#"))
    for token in sorted(set(re.findall(r"\bYOUR_[A-Z0-9_]+\b", body))):
        if token not in header:
            errors.append(f"{name}: placeholder {token} is not explained in the header")
    return errors


def all_errors() -> list[str]:
    """Every rule on every file of this folder (the schema checks that need Ray's package are the tests')."""
    errors = []
    for name in LAUNCHER_FILES:
        errors += launcher_errors(_load(name)) + install_errors(_load(name)) + header_errors(name)
        errors += exposure_errors(_load(name))
    for name in KUBERAY_FILES:
        errors += kuberay_errors(_load_all(name)) + header_errors(name)
    return errors + header_errors(RUNTIME_ENV_FILE)


def main() -> int:
    errors = all_errors()
    for error in errors:
        print(error)
    print(f"{len(errors)} problem(s) in {CLUSTERS}" if errors else f"{CLUSTERS}: every check passes")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
