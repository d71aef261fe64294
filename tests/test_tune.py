"""Ray Tune: a tiny search end to end (synthetic data, fake GPUs), and search files checked
before any trial starts."""

import json

import pyarrow.parquet as pq
import pytest

from fedmd_ray.config import ConfigError
from fedmd_ray.tune import _absolute_domain, load_search, search, trial_resources
from tests.conftest import TINY


def tiny_search(**extra):
    config = json.loads(json.dumps(TINY))
    config["resources"] = {"backend": "ray", "num_cpus": 0.5, "num_gpus": 0.25, "torch_threads": 1}
    return {
        "config": config,
        "search": {"train.digest_loss": {"grid": ["mae", "kl"]}},
        "scheduler": "fifo",
        **extra,
    }


TINY_MODEL = (
    "from torch import nn\n\n\ndef tiny(num_classes, image_shape):\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape[1] * image_shape[2], num_classes))\n"
)


@pytest.mark.slow
def test_a_tiny_search_runs_each_trial_in_its_placement_group(ray_session, tmp_path, monkeypatch):
    """Two trials over the participants' models, one of them the user's own file: each trial
    runs in a working directory of its own, so file specs are resolved where the search
    starts (the command's working directory)."""
    (tmp_path / "models.py").write_text(TINY_MODEL)
    monkeypatch.chdir(tmp_path)
    grid = [
        ["models.py:tiny", "cnn3:8,16,16,0.1", "cnn2:16,16,0.2"],
        ["cnn2:8,16,0.1", "cnn3:8,16,16,0.1", "models.py:tiny"],
    ]
    spec = tiny_search()
    spec["search"] = {"models": {"grid": grid}}
    rows = search(spec, tmp_path / "tune", verbose=0, progress=lambda _m: None)
    firsts = sorted(json.loads(r["param:models"])[0] for r in rows)
    assert firsts == sorted(["cnn2:8,16,0.1", str(tmp_path / "models.py") + ":tiny"])
    for row in rows:
        assert row["error"] is None and row["round"] == 2
        assert 0 <= row["mean_accuracy"] <= 1
        assert row["mean_gain"] == pytest.approx(row["mean_accuracy"] - row["lower_bound"])
        run_dir = tmp_path / "tune" / "trials" / row["path"].rsplit("/", 1)[-1] / "fedmd"
        placement = json.loads((run_dir / "placement.json").read_text())
        assert placement["in_trial_group"] and placement["num_gpus"] == 0.25
        participants = json.loads((run_dir / "participants.json").read_text())
        assert [p["visible_gpus"] for p in participants] == ["0"] * 3  # fake GPU from the trial's bundles
    table = pq.read_table(tmp_path / "tune" / "results.parquet").to_pylist()
    assert [r["mean_accuracy"] for r in table] == [r["mean_accuracy"] for r in rows]
    report = (tmp_path / "tune" / "results.md").read_text()
    assert "| models | rounds | mean accuracy | mean gain | error |" in report


@pytest.mark.slow
def test_a_failed_trial_says_why_and_where_its_traceback_is_kept(ray_session, tmp_path):
    """A participant's failure crosses from the trial to the driver pickled: it used to arrive
    as 'TypeError: ParticipantError.__init__() missing 2 required positional arguments', and
    named a traceback in Ray's working copy of the trial, deleted when Ray stops."""
    spec = tiny_search()
    spec["search"] = {"faults": {"grid": [["1:digest:1"]]}}
    spec["set"] = {"train.rounds": 1}
    [row] = search(spec, tmp_path / "tune", verbose=0, progress=lambda _m: None)
    kept = tmp_path / "tune" / "trials" / row["path"].rsplit("/", 1)[-1] / "fedmd" / "error.txt"
    assert row["error"] == (
        "ParticipantError: Participant 'p01-cnn3' failed during digest: RuntimeError: simulated fault "
        f"in digest of round 1 (its traceback: {kept})"
    )
    assert "simulated fault in digest of round 1" in kept.read_text()


def test_a_participants_error_survives_pickling_whole():
    import pickle

    from ray import cloudpickle

    from fedmd_ray.errors import ParticipantError

    error = ParticipantError("p01-cnn3", "digest", "RuntimeError: boom", trace="Traceback ...")
    error.trace_file = "/runs/x/error.txt"
    for codec in (pickle, cloudpickle):
        back = codec.loads(codec.dumps(error))
        assert (type(back), str(back), back.participant, back.phase, back.trace, back.trace_file) == (
            ParticipantError,
            str(error),
            "p01-cnn3",
            "digest",
            "Traceback ...",
            "/runs/x/error.txt",
        )


def test_trial_resources_reserve_the_whole_simulation():
    _, _, config = load_search(tiny_search())
    bundles = trial_resources(config).bundles
    assert bundles == [{"CPU": 0.5}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    spec = tiny_search()
    spec["config"]["resources"]["per_model"] = {"cnn3": {"num_gpus": 0.5}, "cnn2:16,16,0.2": {"num_cpus": 1}}
    _, _, config = load_search(spec)
    bundles = trial_resources(config).bundles  # one bundle per participant, each its model's share
    assert bundles == [
        {"CPU": 0.5},
        {"CPU": 0.5, "GPU": 0.25},
        {"CPU": 0.5, "GPU": 0.5},
        {"CPU": 1, "GPU": 0.25},
    ]


def test_a_share_for_a_users_model_file_follows_it_into_the_trials(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(TINY_MODEL)
    monkeypatch.chdir(tmp_path)
    spec = tiny_search()
    spec["config"]["models"] = ["models.py:tiny", "cnn2:8,16,0.1"]
    spec["config"]["resources"]["per_model"] = {"models.py:tiny": {"num_cpus": 1}}
    monkeypatch.delenv("FEDMD_DATA_DIR", raising=False)
    _, _, config = load_search(spec)
    assert config.models[0] == f"{(tmp_path / 'models.py').resolve()}:tiny"
    assert config.data.data_dir == str((tmp_path / "data").resolve())  # ./data where the search starts
    assert trial_resources(config).bundles[1:] == [{"CPU": 1, "GPU": 0.25}, {"CPU": 0.5, "GPU": 0.25}]
    # Searched values are anchored by the key they set, as a run's own config is: a search
    # over models, data or runtime_env folders means the same in every trial's directory.
    here = tmp_path.resolve()
    spec["search"] = {
        "models": {"grid": [["models.py:tiny", "cnn2:8,16,0.1"], ["cnn2:8,16,0.1", "models.py:tiny"]]},
        "data": {"choice": [{"private": "npz:a.npz"}]},
        "resources.runtime_env": {"choice": [{"working_dir": ".", "py_modules": ["s3://b/m.zip"]}]},
        "train.lr": {"choice": ["models.py"]},  # not a path key: left as written (and refused later)
    }
    domains = {key: _absolute_domain(key, domain) for key, domain in spec["search"].items()}
    assert domains["models"]["grid"][1] == ["cnn2:8,16,0.1", f"{here}/models.py:tiny"]
    assert domains["data"] == {"choice": [{"private": f"npz:{here}/a.npz"}]}
    assert domains["resources.runtime_env"] == {
        "choice": [{"working_dir": str(here), "py_modules": ["s3://b/m.zip"]}]
    }
    assert domains["train.lr"] == {"choice": ["models.py"]}


def test_bad_search_files_fail_before_any_trial():
    with pytest.raises(ConfigError, match="train.digest_los.*Did you mean 'digest_loss'"):
        load_search(tiny_search(search={"train.digest_los": {"choice": ["mae"]}}))
    with pytest.raises(ConfigError, match="known: choice, grid, uniform, loguniform, randint"):
        load_search(tiny_search(search={"train.lr": {"normal": [0, 1]}}))
    with pytest.raises(ConfigError, match="low < high"):
        load_search(tiny_search(search={"train.lr": {"loguniform": [0.1, 0.01]}}))
    with pytest.raises(ConfigError, match="no 'search' section"):
        load_search(tiny_search(search={}))
    with pytest.raises(ConfigError, match="'num_samples' \\(--samples\\) is '2'; it must be a whole number"):
        load_search(tiny_search(num_samples="2"))
    with pytest.raises(ConfigError, match="'max_concurrent_trials' is -1"):
        load_search(tiny_search(max_concurrent_trials=-1))
    # Every value a trial may draw is checked, not only the first one.
    with pytest.raises(ConfigError, match=r"Search key 'train.rounds', value -2: 'train.rounds' is -2"):
        load_search(tiny_search(search={"train.rounds": {"grid": [1, -2]}}))
    with pytest.raises(ConfigError, match=r"value 2.0: 'train.trim_fraction' is 2.0"):
        load_search(tiny_search(search={"train.trim_fraction": {"uniform": [0.1, 2.0]}}))
    with pytest.raises(ConfigError, match=r'to draw from it, write \{"choice": \[...\]\}.*: train.rounds\)'):
        load_search(tiny_search(search={"train.rounds": [1, 2]}))


def test_a_trial_larger_than_the_cluster_is_refused_before_tune_waits_forever(ray_session, tmp_path):
    spec = tiny_search()
    spec["config"]["resources"]["num_cpus"] = 1.0  # 0.5 + 3 x 1 CPU > the 2 CPUs Ray has
    with pytest.raises(
        ConfigError, match=r"One trial reserves 3.5 CPUs .*has 2\. Set resources.num_cpus to 0.5 or less"
    ):
        search(spec, tmp_path / "t", verbose=0, progress=lambda _m: None)


def test_trials_share_the_cluster_evenly_by_default():
    spec = tiny_search()
    del spec["config"]["resources"]["num_cpus"]
    _, _, config = load_search(spec)
    assert trial_resources(config, {"CPU": 2.0}).bundles[1]["CPU"] == 0.5


def test_gpu_trials_take_at_most_one_cpu_per_actor_so_trials_can_share_a_machine():
    spec = tiny_search()
    del spec["config"]["resources"]["num_cpus"]
    spec["config"]["resources"]["num_gpus"] = 0.1
    _, _, config = load_search(spec)
    bundles = trial_resources(config, {"CPU": 16.0, "GPU": 1.0}).bundles
    assert [b["CPU"] for b in bundles[1:]] == [1.0] * (len(bundles) - 1)
    assert [b["GPU"] for b in bundles[1:]] == [0.1] * (len(bundles) - 1)
    # a small machine keeps its even share: below one CPU each
    assert trial_resources(config, {"CPU": 2.0, "GPU": 1.0}).bundles[1]["CPU"] == 0.5
