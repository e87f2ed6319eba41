from pathlib import Path

import pytest
import yaml

from clipcap.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.mapper.type == "transformer" and cfg.lm.finetune is False
    assert cfg.encoder.name == "efficientnet-lite0" and cfg.lm.name == "smollm2-135m"


def test_missing_sections_take_defaults():
    assert config_from_dict({}) == Config()


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"train": {"lrr": 0.1}}, "train.lrr"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"mapper": {"type": "lstm"}}, "mapper.type"),
        ({"lm": {"finetune": "yes"}}, "lm.finetune"),
        ({"split": {"test_fraction": 1.5}}, "split.test_fraction"),
        ({"trainer": {}}, "trainer"),
        ({"dataset": ["tuxpaint"]}, "dataset"),
    ],
)
def test_bad_params_name_the_key(params, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(params)
    assert str(err.value).startswith(key), err.value


def test_missing_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- one source of defaults
PARAMS = ROOT / "params.yaml"


def _leaves(data: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in data.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return out


def test_params_yaml_spells_out_the_defaults():
    """params.yaml and the dataclass defaults are the same run: the documented embedded default."""
    assert load_config(PARAMS) == Config()


@pytest.mark.parametrize("key", [".".join(k) for k in _leaves(yaml.safe_load(PARAMS.read_text()))])
def test_removing_a_key_from_params_yaml_changes_nothing(key):
    data = yaml.safe_load(PARAMS.read_text())
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    del node[leaf]
    assert config_from_dict(data) == load_config(PARAMS), f"without {key} the run would change"
