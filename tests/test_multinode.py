"""Participants spread over a real multi-node Ray cluster (ray.cluster_utils.Cluster, all on
loopback, fake GPUs), placed by a placement group."""

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from fedmd_ray import run
from fedmd_ray.backends.ray_backend import RayBackend
from fedmd_ray.errors import ResourceError
from fedmd_ray.fedmd import participant_specs
from fedmd_ray.phases import Phase
from fedmd_ray.tasks import build_task
from tests.conftest import numbers, tiny_config


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1"}
    )
    cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_live_heads_address_is_let_through(two_nodes):
    from fedmd_ray.backends.resources import _check_reachable

    assert _check_reachable(two_nodes.address) is None  # its GCS answers: joining it is Ray's to do


def _wait_until_whole():
    # Killing actors and removing a placement group are asynchronous: a group made while the
    # last test's actors still hold one node's CPU or GPU finds that node half taken, and a
    # soft SPREAD then packs both bundles onto the other node.
    whole = {k: ray.cluster_resources()[k] for k in ("CPU", "GPU")}
    deadline = time.time() + 30
    while time.time() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= v for k, v in whole.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the two-node cluster did not free its resources in 30 s: {free}")


def _backend(config):
    _wait_until_whole()
    task = build_task(config)
    return RayBackend(config, task, participant_specs(config, task))


def _nodes(config):
    backend = _backend(config)
    try:
        return backend.placement["nodes"]
    finally:
        backend.shutdown()


@pytest.mark.slow
def test_spread_and_pack(two_nodes):
    models = {"models": ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1"]}
    spread = _nodes(
        tiny_config(**models, resources={"backend": "ray", "placement": "SPREAD", "num_cpus": 0.5})
    )
    pack = _nodes(tiny_config(**models, resources={"backend": "ray", "placement": "PACK", "num_cpus": 0.5}))
    assert len(set(spread)) == 2
    assert len(set(pack)) == 1


@pytest.mark.slow
def test_multi_node_run_matches_the_one_process_run(two_nodes):
    config = tiny_config(
        resources={
            "backend": "ray",
            "placement": "SPREAD",
            "torch_threads": 1,
            "num_cpus": 0.5,
            "num_gpus": 0.5,
        }
    )
    spread = run(config, progress=None)
    local = run(tiny_config(), progress=None)
    assert numbers(spread.metrics.to_pylist()) == numbers(local.metrics.to_pylist())


@pytest.mark.slow
def test_each_model_gets_its_own_share_across_two_nodes(two_nodes):
    # Each node has one (fake) GPU. A cnn3 that needs a whole one and two cnn2s that need
    # half each fit only one way: the cnn3 on one node, both cnn2s on the other.
    config = tiny_config(
        models=["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2"],
        resources={
            "backend": "ray",
            "placement": "PACK",
            "num_cpus": 0.5,
            "per_model": {"cnn3": {"num_gpus": 1}, "cnn2": {"num_gpus": 0.5}},
        },
    )
    backend = _backend(config)
    try:
        nodes = backend.placement["nodes"]
        shares = [p["num_gpus"] for p in backend.placement["per_participant"]]
        gpus = ray.get([a.call.remote(Phase.SETUP) for a in backend.slots.actors])
    finally:
        backend.shutdown()
    assert shares == [0.5, 1, 0.5]
    assert nodes[0] == nodes[2] != nodes[1]
    assert [metrics["gpu_share"] for metrics, _ in gpus] == [0.5, 1.0, 0.5]


@pytest.mark.slow
def test_a_pool_spread_over_two_nodes_matches_the_one_process_run(two_nodes):
    # 3 participants on 2 pool actors, one per node: states move between nodes through the
    # object store and must come back bit-exactly.
    config = tiny_config(resources={"backend": "ray", "placement": "SPREAD", "actors": 2, "num_cpus": 0.5})
    nodes = _nodes(config)
    assert len(nodes) == 2 and len(set(nodes)) == 2
    _wait_until_whole()
    pooled = run(config, progress=None)
    local = run(tiny_config(), progress=None)
    assert numbers(pooled.metrics.to_pylist()) == numbers(local.metrics.to_pylist())


@pytest.mark.slow
def test_impossible_placement_is_refused(two_nodes, monkeypatch):
    import fedmd_ray.backends.resources as backends

    monkeypatch.setattr(backends, "PLACEMENT_TIMEOUT_SECONDS", 3)
    config = tiny_config(
        models=["cnn2:8,16,0.1"] * 3,
        resources={"backend": "ray", "placement": "STRICT_SPREAD", "num_cpus": 0.5},
    )
    with pytest.raises(ResourceError, match="Could not place 3 participants .* STRICT_SPREAD"):
        run(config, progress=None)


@pytest.mark.slow
def test_user_code_reaches_actors_on_both_nodes(two_nodes, tmp_path, monkeypatch):
    """A model file and a consensus file in a folder of the user's, outside the package and
    off the workers' sys.path, shipped by runtime_env to actors on two nodes."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "widths.py").write_text("WIDTH = 6\n")
    (folder / "nets.py").write_text(
        "from torch import nn\nfrom widths import WIDTH\n\n\n"
        "def small(num_classes, image_shape, width=WIDTH):\n"
        "    return nn.Sequential(nn.Conv2d(image_shape[0], width, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, num_classes))\n"
    )
    (folder / "agg.py").write_text(
        "def trimmed(scores, weights=None, keep=0.9):\n    return scores.mean(axis=0) * keep\n"
    )
    monkeypatch.chdir(folder)
    settings = {
        "models": ["nets.py:small", "nets.py:small?width=10"],
        "train": {"consensus": "agg.py:trimmed?keep=0.8"},
    }
    spread = tiny_config(**settings, resources={"backend": "ray", "placement": "SPREAD", "num_cpus": 0.5})
    on_two = run(spread, folder / "ray", progress=None)
    placement = (folder / "ray" / "placement.json").read_text()
    assert len({n for n in __import__("json").loads(placement)["nodes"]}) == 2
    local = run(tiny_config(**settings), progress=None)
    assert numbers(on_two.metrics.to_pylist()) == numbers(local.metrics.to_pylist())


@pytest.mark.slow
def test_checkpoints_are_never_node_local(two_nodes, tmp_path, monkeypatch):
    """A run folder given as a local path, on two nodes: a path each node would resolve on a
    disk of its own (here: the driver's working directory is not the workers'). Every state
    is written by the driver into its folder, none where the actors run, and the run
    resumes from it with the same numbers."""
    import json
    from pathlib import Path

    import ray

    workers_cwd = Path(ray.get(ray.remote(lambda: __import__("os").getcwd()).remote()))
    monkeypatch.chdir(tmp_path)
    settings = {"resources": {"backend": "ray", "placement": "SPREAD", "num_cpus": 0.5}}
    run(tiny_config(**settings, train={"rounds": 1}), "runs/x", progress=None)
    manifest = json.loads((tmp_path / "runs/x/checkpoint/latest.json").read_text())
    assert {e["written_by"] for e in manifest["participants"].values()} == {"driver"}
    assert sorted(p.name for p in (tmp_path / "runs/x/checkpoint/round-0001").iterdir()) == [
        "p00-cnn2.pt",
        "p01-cnn3.pt",
        "p02-cnn2.pt",
    ]
    assert not (workers_cwd / "runs" / "x").exists()
    resumed = run(tiny_config(**settings, train={"rounds": 2}), "runs/x", progress=None, resume=True)
    whole = run(tiny_config(train={"rounds": 2}), progress=None)
    assert numbers(resumed.metrics.to_pylist()) == numbers(whole.metrics.to_pylist())


@pytest.mark.slow
def test_a_model_importing_from_a_subfolder_runs_on_both_nodes(two_nodes, tmp_path, monkeypatch):
    folder = tmp_path / "user"
    (folder / "layers").mkdir(parents=True)
    (folder / "layers" / "blocks.py").write_text(
        "from torch import nn\n\n\ndef head(width, classes):\n    return nn.Linear(width, classes)\n"
    )
    (folder / "nets.py").write_text(
        "from torch import nn\nfrom layers.blocks import head\n\n\n"
        "def net(num_classes, image_shape):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(256, 7), nn.ReLU(), head(7, num_classes))\n"
    )
    monkeypatch.chdir(folder)
    models = {"models": ["nets.py:net", "cnn2:8,16,0.1"]}
    spread = tiny_config(**models, resources={"backend": "ray", "placement": "SPREAD", "num_cpus": 0.5})
    on_two = run(spread, folder / "ray", progress=None)
    assert (
        len({n for n in __import__("json").loads((folder / "ray" / "placement.json").read_text())["nodes"]})
        == 2
    )
    local = run(tiny_config(**models), progress=None)
    assert numbers(on_two.metrics.to_pylist()) == numbers(local.metrics.to_pylist())
