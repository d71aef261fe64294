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
        assert (ROOT / local).exists(), f"file mount source {local} is missing"


def test_a_broken_field_is_caught():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(config))
