import pytest
import yaml

from imagenet_resnet.config import Config, ConfigError, load_config


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet18}\noptim: {lr: 1, weight_decay: 5e-5}\nschedule: {milestones: [1, 2]}\n")
    cfg = load_config(recipe, ["optim.lr=0.25", "data.crop_scale=[0.35, 1]", "train.deterministic=true"])
    assert cfg.model.name == "resnet18"
    assert cfg.optim.lr == 0.25 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 5e-5  # YAML 1.1 reads "5e-5" as a string; we take it as the number
    assert cfg.schedule.milestones == [1.0, 2.0]
    assert cfg.data.crop_scale == [0.35, 1.0]
    assert cfg.train.deterministic is True


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "model.width=16"])
    again = Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("train.epochs=ten", "expected int"),
    ("train.deterministic=1", "expected true or false"),
    ("schedule.name=exp", "choose step, cosine"),
    ("data.pipeline=torchvision", "choose fast, full-decode, reference"),
    ("model.variant=D", "choose b, c, d"),
    ("lr=1", "expected section.key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_recipe_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")

