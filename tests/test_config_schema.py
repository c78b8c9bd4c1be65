"""One truth per setting: every key's type, default and range is declared once, in its group's dataclass
(qllm_pipeline/core/config.py, registered in Hydra's ConfigStore), and the conf/ YAML files hold only values that
differ from those declarations."""
import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from conftest import REPO
from qllm_pipeline.core.config import SECTIONS, QLLMConfig, TrainLowRankConfig, TuneE2EConfig, group_config
from qllm_pipeline.core.schema import CHECKED_ELSEWHERE, SCHEMA
from qllm_pipeline.core.settings import default_of
from qllm_pipeline.methods.e2e_tuning import E2EConfig
from qllm_pipeline.methods.lowrank import LowRankConfig
from qllm_pipeline.methods.weight_rounding import GPTQConfig

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "method", "tuned"))
FILES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def declared(section: str) -> dict:
    return {f.name: default_of(f) for f in dataclasses.fields(SECTIONS[section])}


def check_values(section: str, values: dict, where: str) -> None:
    defaults = declared(section)
    for key, value in values.items():
        assert key in defaults, f"{where}: {section}.{key} is not declared in {SECTIONS[section].__name__}"
        assert value != defaults[key], f"{where}: {section}.{key}={value!r} restates the declared default"
        if (section, key) not in CHECKED_ELSEWHERE and not (isinstance(value, str) and "${" in value):
            SCHEMA[section][key].check(f"{section}.{key}", value)  # raises on a value out of its range


def test_every_group_is_a_registered_dataclass():
    assert set(GROUPS) == set(SECTIONS) - {"pipeline"}
    repo = ConfigStore.instance().repo
    assert "qllm_schema.yaml" in repo
    for group in GROUPS:
        node = repo[group]["schema.yaml"].node
        assert list(node.keys()) == [f.name for f in dataclasses.fields(SECTIONS[group])]
    assert [f.name for f in dataclasses.fields(QLLMConfig)] == list(SECTIONS)


@pytest.mark.parametrize("group, option", FILES, ids=[f"{g}/{o}" for g, o in FILES])
def test_a_group_file_holds_only_what_differs_and_in_range(group, option):
    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
    check_values(group, values, f"conf/{group}/{option}.yaml")


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_a_recipe_sets_only_declared_keys_to_new_values(method):
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{method}.yaml"))
    assert set(recipe) <= set(SECTIONS)
    for section, values in recipe.items():
        if section == "pipeline":
            assert set(values) == {"stages"}
            continue
        check_values(section, values, f"conf/method/{method}.yaml")


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "tuned").glob("*.yaml")))
def test_a_models_tuned_settings_are_declared_keys_and_win_over_the_recipe_not_the_command_line(model):
    """conf/tuned/<model>.yaml (settings chosen on that model's held-out windows) is a conf/model entry's, sets only
    declared keys to new values, applies to that model alone, wins over a recipe, and loses to the command line."""
    assert (CONF / "model" / f"{model}.yaml").is_file()
    tuned = OmegaConf.to_container(OmegaConf.load(CONF / "tuned" / f"{model}.yaml"))
    assert set(tuned) <= set(SECTIONS) - {"pipeline", "model"}
    for section, values in tuned.items():
        check_values(section, values, f"conf/tuned/{model}.yaml")
    (section, values), = tuned.items()
    key, value = next(iter(values.items()))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        composed = lambda *o: OmegaConf.to_container(compose("config", overrides=list(o)))[section][key]  # noqa: E731
        assert composed(f"model={model}") == value
        assert composed(f"model={model}", "method=rotation_lrc_gptq") == value
        other = next(p.stem for p in (CONF / "model").glob("*.yaml") if not (CONF / "tuned" / p.name).is_file())
        assert composed(f"model={other}") == declared(section)[key] != value  # another model: the default
        chosen = 0.123 if isinstance(value, float) else value
        assert composed(f"model={model}", f"{section}.{key}={chosen}") == chosen


def test_the_methods_configs_are_the_groups_schemas():
    """The training code's own configs are the declarations (no second default or range to drift)."""
    assert SECTIONS["gptq"] is GPTQConfig
    assert issubclass(TrainLowRankConfig, LowRankConfig) and issubclass(TuneE2EConfig, E2EConfig)
    added = {f.name for f in dataclasses.fields(TrainLowRankConfig)} - {f.name for f in dataclasses.fields(LowRankConfig)}
    assert added == {"enabled"}
    assert set(TuneE2EConfig.__dataclass_fields__) == set(E2EConfig.__dataclass_fields__)
    # the code's default is the default a recipe that sets nothing runs with (method=lrc); the default job's recipe
    # changes exactly the LRC epochs (conf/method/qllm.yaml, the held-out rule's choice)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        plain = OmegaConf.to_container(compose("config", overrides=["method=lrc"]), resolve=False)
        default_job = OmegaConf.to_container(compose("config"), resolve=False)
    lowrank = lambda cfg: {k: cfg["train_lowrank"][k] for k in declared("train_lowrank") if k != "enabled"}  # noqa: E731
    assert lowrank(plain) == dataclasses.asdict(LowRankConfig())
    assert lowrank(default_job) == {**dataclasses.asdict(LowRankConfig()), "epochs": 6}
    assert plain["gptq"] == default_job["gptq"] == dataclasses.asdict(GPTQConfig())


def test_group_config_is_what_the_group_composes_to():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["quant=w8a8", "model=llama2_70b"]), resolve=False)
    assert group_config("quant", "w8a8") == cfg["quant"]
    assert group_config("model", "llama2_70b") == cfg["model"]
    assert group_config("quant", "w8a8")["a_clip_ratio"] == 1.0  # declared, not in the file


def test_a_wrong_type_in_a_recipe_file_is_refused_when_composing(tmp_path):
    """Hydra checks a YAML value against the declared type as it composes (the CLI's own message covers the command
    line, tests/test_bad_settings.py)."""
    (tmp_path / "train_lowrank").mkdir()
    (tmp_path / "train_lowrank" / "bad.yaml").write_text("rank: four\n")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="rank"):
            compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "train_lowrank=bad"])
