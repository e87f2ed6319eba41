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


# ---- several datasets in one params.yaml ---------------------------------------------------------

SHARED = {"train": {"epochs": 4, "lr": 0.001}, "dataset": {"source": "tuxpaint", "limit": 50},
          "datasets": {"stamps": {}, "mine": {"dataset": {"source": "folder", "root": "/photos"},
                                              "train": {"epochs": 9}}}}


def test_a_dataset_is_the_shared_sections_with_its_overrides_key_by_key():
    mine = config_from_dict(SHARED, "mine")
    assert (mine.dataset.name, mine.dataset.source, mine.dataset.root) == ("mine", "folder", "/photos")
    assert mine.dataset.limit == 50  # a shared key the override leaves alone
    assert (mine.train.epochs, mine.train.lr) == (9, 0.001)
    stamps = config_from_dict(SHARED, "stamps")
    assert (stamps.dataset.name, stamps.dataset.source, stamps.train.epochs) == ("stamps", "tuxpaint", 4)


def test_the_first_dataset_is_the_default_and_each_has_its_own_batches_folder():
    assert config_from_dict(SHARED).dataset.name == "stamps"
    assert config_from_dict(SHARED, "mine").dataset.batches == Path("data/mine")
    assert config_from_dict({"dataset": {"batches_dir": "incoming"}}).dataset.batches == Path("incoming")


def test_the_project_params_define_tuxpaint_first_and_openclipart():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(data["datasets"])[:2] == ["tuxpaint", "openclipart"]
    assert load_config(ROOT / "params.yaml") == load_config(ROOT / "params.yaml", "tuxpaint") == Config()
    openclipart = load_config(ROOT / "params.yaml", "openclipart")
    assert openclipart.dataset.source == "openclipart" and openclipart.validate.max_caption_repeats == 20


@pytest.mark.parametrize(
    ("dataset", "datasets", "message"),
    [
        ("other", {"stamps": {}}, "dataset 'other': not defined in params.yaml (datasets: stamps)"),
        (None, {"bad name": {}}, "datasets.bad name: not a usable dataset name"),
        (None, [], "datasets: expected a mapping"),
        (None, {"stamps": {"dataset": {"name": "x"}}}, "datasets.stamps.dataset.name: 'x'"),
        (None, {"stamps": {"train": 3}}, "datasets.stamps.train: expected a mapping"),
        (None, {"stamps": {"train": {"lrr": 1}}}, "train.lrr: unknown key"),
    ],
)
def test_bad_datasets_are_named(dataset, datasets, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"datasets": datasets}, dataset)
    assert str(err.value).startswith(message), err.value


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("datasets: {stamps: {}}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: dataset 'x': not defined"):
        load_config(tmp_path / "params.yaml", "x")


def test_the_tracking_uri_comes_from_the_environment_unless_params_name_one(monkeypatch):
    from clipcap.config import RegisterConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert RegisterConfig().tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert RegisterConfig().tracking_uri == "http://127.0.0.1:5000"
    assert RegisterConfig(tracking_uri="sqlite:///other.db").tracking_uri == "sqlite:///other.db"


def test_each_dataset_can_have_its_own_schedule():
    from clipcap.config import config_from_dict

    data = {"schedule": {"cron": "0 3 * * *"}, "datasets": {"a": {}, "b": {"schedule": {"cron": "*/15 * * * *"}}}}
    assert config_from_dict(data, "a").schedule.cron == "0 3 * * *"
    assert config_from_dict(data, "b").schedule.cron == "*/15 * * * *"
    with pytest.raises(ConfigError, match="schedule.cron"):
        config_from_dict({"schedule": {"cron": "daily"}})


# ---------------------------------------------------------------- a bounded read of params.yaml
BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    + ["datasets: {stamps: {}}", "dataset: {categories: *i}"]) + "\n"  # 9**9: 387 million strings


def test_a_yaml_alias_bomb_is_refused_fast_in_little_memory(tmp_path):
    import time
    import tracemalloc

    (tmp_path / "params.yaml").write_text(BILLION_LAUGHS)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / "params.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0 and peak < 20 << 20
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'params.yaml'}: its YAML aliases") and "\n" not in message
    assert "more than 100,000 values" in message and "write the values out" in message


def test_a_yaml_alias_holding_itself_is_refused(tmp_path):
    from clipcap.config import read_params

    (tmp_path / "params.yaml").write_text("train: &t {nested: *t}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: the YAML alias at line 1 refers back into its own anchor"):
        read_params(tmp_path / "params.yaml")


def test_a_few_aliases_still_work(tmp_path):
    from clipcap.config import read_params

    (tmp_path / "params.yaml").write_text("base: &base {epochs: 2, lr: 0.001}\ntrain: {<<: *base, epochs: 3}\n")
    assert read_params(tmp_path / "params.yaml")["train"] == {"epochs": 3, "lr": 0.001}


def test_a_params_file_over_a_megabyte_is_refused_unparsed(tmp_path):
    from clipcap.config import MAX_PARAMS_BYTES, read_params

    (tmp_path / "params.yaml").write_text("train: {epochs: 2}\n" + "# padding\n" * (MAX_PARAMS_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"params.yaml: 1,048,599 bytes, more than the 1,048,576 a parameter file "
                                          r"may have; .*git checkout params.yaml"):
        read_params(tmp_path / "params.yaml")


def test_an_integer_yaml_cannot_convert_is_a_config_error(tmp_path):
    from clipcap.config import read_params

    (tmp_path / "params.yaml").write_text(f"train: {{epochs: {'9' * 5000}}}\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML: Exceeds the limit"):
        read_params(tmp_path / "params.yaml")
