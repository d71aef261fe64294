"""cluster.yaml passes Ray's own cluster-config validation (the schema `ray up` checks)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_ray_up():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert any("pip install" in c and "fedmd_ray" in c for c in config["setup_commands"])
    for local in config["file_mounts"].values():
        if local.startswith("~"):
            continue  # the user's own (Ray's token, made by `ray get-auth-token --generate`)
        assert (ROOT / local).exists(), f"file mount source {local} is missing"


def test_a_broken_field_is_caught():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(config))


def test_cluster_yaml_ami_is_resolved_by_rays_aws_provider():
    # A made-up AMI id fails only at `ray up` time; latest_dlami is filled in by Ray itself.
    import importlib.util
    import re

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    images = {k: t["node_config"]["ImageId"] for k, t in config["available_node_types"].items()}
    assert set(images.values()) == {"latest_dlami"}
    # Ray's AWS provider (it imports boto3, not installed here: read its source) maps
    # latest_dlami to its default AMI of the region, and has one for ours.
    aws = Path(importlib.util.find_spec("ray.autoscaler._private.aws").origin).parent / "config.py"
    source = aws.read_text()
    assert '"latest_dlami"' in source
    assert re.search(rf'"{config["provider"]["region"]}": "ami-[0-9a-f]+"', source)


def _kuberay_documents():
    return [d for d in yaml.safe_load_all((ROOT / "kuberay" / "rayjob.yaml").read_text()) if d]


def test_kuberay_rayjob_manifest_parses_and_asks_for_gpu_workers():
    docs = _kuberay_documents()
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    workers = spec["workerGroupSpecs"]
    gpu = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in workers
        for c in g["template"]["spec"]["containers"]
    ]
    assert gpu and all(int(n) >= 1 for n in gpu)
    # The results volume the entrypoint writes to is mounted on the head, where the driver runs,
    # and its claim is defined in the same file.
    head = spec["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert "/results" in mounts
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]}
    assert claims <= {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    # Every container runs the image the Dockerfile builds.
    images = {c["image"] for c in head["containers"]} | {
        c["image"] for g in workers for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1
    assert "rayproject/ray:" + ray.__version__ in (ROOT / "kuberay" / "Dockerfile").read_text()


def test_kuberay_entrypoint_is_a_valid_fedmd_ray_command():
    import shlex

    from fedmd_ray.cli import build_parser, resolve_config

    job = next(d for d in _kuberay_documents() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "fedmd-ray"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.out.startswith("/results/")
    config = resolve_config(args.preset, args.config, args.set, args.data_dir, args.download)
    assert config.resources.num_gpus == 0.1 and config.num_participants == 10
    assert args.address is None  # KubeRay sets RAY_ADDRESS for the driver; init_ray honours it


def test_the_cluster_files_keep_ray_off_the_network_and_ask_for_a_token():
    """Ray's dashboard and jobs API run any code they are sent: bound to localhost, behind
    token authentication on every node, and on Kubernetes behind a NetworkPolicy."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]
    ray_starts = [c for c in starts if "ray start" in c]
    assert ray_starts and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node

    docs = _kuberay_documents()
    cluster = next(d for d in docs if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]  # this namespace's pods only

    readme = (ROOT / "README.md").read_text()
    assert "## Security" in readme and "RAY_AUTH_MODE=token" in readme


def test_kuberay_checkpoints_need_only_the_volume_the_driver_writes_to():
    """The entrypoint writes to a local path on a cluster of several nodes: the driver (on
    the head, where the claim is mounted) writes every participant's state itself, so the
    workers need no volume; an object store URI would need none at all."""
    docs = _kuberay_documents()
    job = next(d for d in docs if d["kind"] == "RayJob")
    out = job["spec"]["entrypoint"].split("--out", 1)[1].split()[0]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert "://" not in out and any(out.startswith(m + "/") for m in mounts)
    # (tests/test_multinode.py runs that case: a local path on two nodes, written by the driver)
