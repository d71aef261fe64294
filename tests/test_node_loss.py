"""A worker node lost mid-run (a spot instance taken back, a machine that died), on a real
multi-node Ray (ray.cluster_utils.Cluster on loopback): the participants it held come back
on another node with exactly their numbers, and a cluster with no room left stops the run
saying so instead of waiting for ever."""

import threading

import pytest
import ray
from ray.cluster_utils import Cluster

from fedmd_ray import run
from fedmd_ray.backends import slots
from fedmd_ray.errors import ResourceError
from tests.conftest import numbers, tiny_config

# One CPU per participant: the head holds one of the three, the worker node the others (and
# their states, in its object store).
RESOURCES = {"backend": "ray", "torch_threads": 1, "num_cpus": 1, "device": "cpu", "reuse_actors": False}


@pytest.fixture
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    worker = cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def _run_losing(cluster, worker, out, replace: bool, **resources):
    """Run 4 rounds in a thread; as round 2 ends, the worker node goes (and, with `replace`,
    a new one comes). What the run said, and its result or error."""
    said: list[str] = []
    ended = threading.Event()
    outcome: dict = {}

    def go():
        try:
            outcome["result"] = run(
                tiny_config(resources={**RESOURCES, **resources}, train={"rounds": 4}),
                out,
                progress=said.append,
                on_round=lambda r, _summary: r == 2 and ended.set(),
            )
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc
        ended.set()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    assert ended.wait(180), "the run did not reach round 2"
    cluster.remove_node(worker)
    if replace:
        cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
    thread.join(240)
    assert not thread.is_alive(), f"the run hung after its node was lost; it said: {said[-5:]}"
    return said, outcome


@pytest.mark.slow
@pytest.mark.parametrize("actors", [None, 2], ids=["own-actors", "pool"])
def test_a_lost_node_costs_time_not_numbers(cluster, tmp_path, actors):
    said, outcome = _run_losing(*cluster, tmp_path / "run", replace=True, actors=actors)
    assert "error" not in outcome, outcome.get("error")
    lost = outcome["result"]
    rows = lost.metrics.to_pylist()
    recovered = [line for line in said if "continuing from the last checkpoint" in line]
    restarted = [r for r in rows if r["note"] and r["note"].startswith("restarted")]
    assert recovered or restarted, said  # the loss was seen, and survived one way or the other
    alone = run(tiny_config(train={"rounds": 4}), progress=None)
    assert numbers(rows) == numbers(alone.metrics.to_pylist())


@pytest.mark.slow
def test_a_cluster_without_room_for_a_lost_participant_says_so(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(slots, "RESTART_WAIT_S", 10.0)
    said, outcome = _run_losing(*cluster, tmp_path / "run", replace=False)
    error = outcome.get("error")
    assert isinstance(error, ResourceError), (error, said[-3:])
    message = str(error)
    # Either its actor found no room, or (its state lost) the run's restart from its
    # checkpoint found the cluster too small: both say what is missing.
    assert "could not be restarted" in message or "the Ray cluster has" in message, message
    assert (tmp_path / "run" / "checkpoint").is_dir()  # what --resume continues from


def test_the_errors_a_node_loss_raises_cross_processes_whole():
    """A pool actor answers StateLost inside Failed; a participant's write raises
    StorageError: both are pickled back to the driver, and must arrive as themselves."""
    import pickle

    from fedmd_ray.errors import Failed, StateLost, StorageError

    failed = pickle.loads(pickle.dumps(Failed(StateLost("p01-cnn3", "its state"))))
    assert isinstance(failed.error, StateLost)
    assert (failed.error.participant, failed.error.what) == ("p01-cnn3", "its state")
    assert str(failed.error) == "Participant 'p01-cnn3' lost its state with the node that held it"
    told = pickle.loads(pickle.dumps(StateLost("p01-cnn3", "its state", "continue with --resume x")))
    assert (
        str(told)
        == "Participant 'p01-cnn3' lost its state with the node that held it; continue with --resume x"
    )
    full = pickle.loads(pickle.dumps(StorageError("Could not write x (the disk is full: free space there)")))
    assert (
        isinstance(full, StorageError)
        and str(full) == "Could not write x (the disk is full: free space there)"
    )
