import json

import pytest

from fedmd_ray.cli import resolve_config
from fedmd_ray.config import Config, ConfigError, from_dict, parse_overrides
from fedmd_ray.presets import PRESETS


def test_defaults_are_valid_and_overrides_are_typed():
    config = resolve_config(
        "smoke",
        None,
        [
            "train.rounds=7",
            "train.lr=0.01",
            "resources.backend=local",
            'models=["cnn2", "cnn3"]',
            "data.public_classes=[0,1,2]",
            "data.download=true",
        ],
    )
    assert isinstance(config, Config)
    assert config.train.rounds == 7 and isinstance(config.train.rounds, int)
    assert config.train.lr == pytest.approx(0.01)
    assert config.models == ["cnn2", "cnn3"]
    assert config.data.public_classes == [0, 1, 2]
    assert config.data.download is True


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.round'.*Did you mean 'rounds'"):
        resolve_config("smoke", None, ["train.round=5"])
    with pytest.raises(ConfigError, match="Unknown config key 'modles'.*'models'"):
        from_dict({"modles": ["cnn2"]})


@pytest.mark.parametrize(
    "pair, message",
    [
        ("train.rounds=-1", "'train.rounds' is -1; it must be zero or more"),
        ("train.public_subset_size=0", "'train.public_subset_size' is 0; it must be greater than zero"),
        ("train.lr=abc", "'train.lr' must be a number"),
        ("train.rounds=2.5", "'train.rounds' must be an integer"),
        ("train.rounds=+-5", "'train.rounds' must be an integer, got '+-5'"),
        ("resources.num_gpus=1.5", "whole number of GPUs"),
        ("resources.num_gpus=-0.1", "'resources.num_gpus' is -0.1"),
        ("resources.backend=spark", "'resources.backend' is 'spark'; it must be one of ray, local"),
        ("train.digest_loss=kld", "Did you mean 'kl'"),
        ("train.consensus=avg", "'train.consensus' is 'avg'"),
        ('models=["resnet19"]', "Unknown model 'resnet19'. Did you mean 'resnet18'"),
        ("data.public=mnits", "Unknown dataset 'mnits'. Did you mean 'mnist'"),
        ("partition.kind=noniid", "'partition.kind' is 'noniid'"),
        ('faults=["9:digest:1"]', "index must be 0..3"),
        ("seed=-1", "'seed' is -1; it must be a whole number from 0"),
        ("data.public_classes=[]", "'data.public_classes' is empty; name the classes to use, or null"),
        ("data.private_classes=[]", "'data.private_classes' is empty"),
        # A shell that ate the quotes: said so, not split into models named '[cnn2' and 'cnn3]'.
        (
            "models=[cnn2,cnn3]",
            """'models' is [cnn2,cnn3], which is not a JSON list: write it as one, quoted for the shell, e.g. --set 'models=["cnn2","cnn3"]'""",
        ),
        ("data.private_classes=[0,1,x]", "e.g. --set 'data.private_classes=[0,1]'"),
        (
            "data.private_classes=[10,10,11]",
            "'data.private_classes' names class 10 more than once; name each once",
        ),
        ("sharing.adversaries=[1,2,1]", "'sharing.adversaries' names participant 1 more than once"),
        ("train.lr=nan", "'train.lr' is 'nan'; it must be a finite number"),  # trained to NaN scores
        ("train.temperature=1e400", "'train.temperature' is inf; it must be a finite number"),
        ("train.lr=true", "'train.lr' must be a number, got True"),
        (
            "name=a/b",
            "'name' is 'a/b'; it must be a non-empty name without / or \\ (it names the results folder)",
        ),
    ],
)
def test_bad_values_name_their_key(pair, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("smoke", None, [pair])
    assert message in str(info.value)


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="Unknown preset 'smok'. Did you mean 'smoke'"):
        resolve_config("smok", None, [])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.rounds"])


def test_config_file_json_and_toml(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"train": {"rounds": 3}, "seed": 5}))
    (tmp_path / "b.toml").write_text("seed = 6\n[train]\nrounds = 4\n")
    assert resolve_config("smoke", str(tmp_path / "a.json"), []).train.rounds == 3
    config = resolve_config("smoke", str(tmp_path / "b.toml"), ["seed=9"])
    assert (config.train.rounds, config.seed) == (4, 9)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be parsed"):
        resolve_config(None, str(tmp_path / "bad.json"), [])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(None, str(tmp_path / "missing.json"), [])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    config = resolve_config(name, None, [])
    assert config.num_participants == len(PRESETS[name]["models"])
    # The round trip through a dict is lossless: what is saved with results can be rerun.
    assert from_dict(config.to_dict()) == config


def test_a_config_built_in_python_is_checked_as_a_files_would_be(tmp_path):
    from fedmd_ray import run
    from fedmd_ray.config import TrainConfig

    for config, message in (
        (Config(train=TrainConfig(rounds=-1)), "'train.rounds' is -1; it must be zero or more"),
        (Config(train=TrainConfig(lr="fast")), "'train.lr' must be a number, got 'fast'"),
        (Config(seed=-3), "'seed' is -3"),
        (Config(), r"share classes .* apart \(as the smoke preset does"),
    ):
        with pytest.raises(ConfigError, match=message):
            run(config, tmp_path / "out", progress=None)
        assert not (tmp_path / "out").exists()


def test_python_values_are_taken_as_their_json_kin():
    import numpy as np

    from fedmd_ray.config import DataConfig, TrainConfig

    built = Config(
        seed=np.int64(2**62 + 1),
        models=("cnn2", "cnn3"),
        data=DataConfig(public_classes=range(10), private_classes=(10, 11), input_shape=(1, 16, 16)),
        train=TrainConfig(rounds=np.int32(3)),
    )
    config = from_dict(built.to_dict())
    assert (config.seed, config.models, config.train.rounds) == (2**62 + 1, ["cnn2", "cnn3"], 3)
    assert config.data.public_classes == list(range(10)) and config.data.input_shape == [1, 16, 16]
    assert from_dict({"seed": "9223372036854775807"}).seed == 2**63 - 1
