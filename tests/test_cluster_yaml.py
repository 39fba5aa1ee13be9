"""cluster.yaml is a valid Ray autoscaler config (Ray's own schema, offline)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises jsonschema.ValidationError on a bad field
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(isinstance(v, int) for t in types.values() for v in t["resources"].values())
    assert any("torch==2.13.0" in c for c in prepared["setup_commands"])


def test_a_broken_cluster_yaml_is_rejected():
    import jsonschema
    import pytest

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["head"]["resources"] = {"CPU": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
