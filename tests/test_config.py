import pytest

from catalog.config import ConfigError, load_config


def test_defaults_are_the_offline_quickstart():
    cfg = load_config()
    assert cfg.data.source == "builtin:tasks"
    assert cfg.model.name == "scratch:tiny-deep"
    assert cfg.artifacts.root == "itune-artifacts"
    assert cfg.train.max_steps == 1200


def test_quickstart_yaml_matches_the_built_in_defaults(tmp_path):
    from tests.conftest import REPO

    assert load_config(REPO / "configs" / "quickstart.yaml").as_dict() == load_config().as_dict()


def test_set_overrides_are_typed():
    cfg = load_config(overrides=["train.epochs=2", "data.source=some/file.jsonl", "train.work_pool=gpu"])
    assert cfg.train.epochs == 2.0
    assert cfg.data.source == "some/file.jsonl"
    assert cfg.train.work_pool == "gpu"


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'train.epochs'"):
        load_config(overrides=["train.epoch=2"])


def test_wrong_type_and_non_positive_sizes_are_rejected():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(overrides=["train.batch_size=0"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(overrides=["train.epochs=lots"])


def test_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
