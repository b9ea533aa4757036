from pathlib import Path

import pytest

from bida.config import Config, dump_config, from_dict, load_config, parse_override, replace_path
from bida.errors import ConfigError


def test_defaults_are_the_embedded_pair():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.source.kind == "synthetic" and cfg.data.target.kind == "synthetic"
    assert cfg.method.name == "source_only"


def test_method_shorthand_in_yaml_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: bida\ntrain:\n  iters: 7\n")
    cfg = load_config(p, ["method.t2s=false", "loss.temperature=0.2"])
    assert cfg.method.name == "bida" and cfg.method.t2s is False
    assert cfg.train.iters == 7 and cfg.loss.temperature == 0.2
    assert load_config(p, ["method=minent"]).method.name == "minent"


def test_tuple_fields_and_int_to_float():
    cfg = load_config(None, ["data.crop=[10,20]", "train.lr=1"])
    assert cfg.data.crop == (10, 20)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.itres=5", "train.itres"),
        ("train.iters=abc", "train.iters"),
        ("train.iters=1.5", "train.iters"),
        ("method=unknown_method", "method.name"),
        ("model.freeze_bn=3", "model.freeze_bn"),
        ("data.crop=[1,2,3]", "data.crop"),
        ("nokeyvalue", "malformed override"),
        ("=3", "malformed override"),
        ("a..b=3", "malformed override"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  iters: 3\n  colour: red\n")
    with pytest.raises(ConfigError, match="train.colour"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_and_frozen(tmp_path):
    cfg = load_config(None, ["method=bida", "data.eval_classes=[0,1,2]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    assert replace_path(cfg, train__iters=9).train.iters == 9


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("model.pretrained=null") == (["model", "pretrained"], None)
    assert parse_override("method=bida") == (["method", "name"], "bida")


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ is empty"
    for f in files:
        load_config(f)


def test_unset_method_feature_follows_the_backbone(tmp_path):
    """method.feature left unset is the backbone's own map; a written one that does not fit fails."""
    assert load_config().method.feature == "aspp_branches"  # ResNet: unchanged default
    assert load_config(None, ["method.feature=backbone"]).method.feature == "backbone"
    p = tmp_path / "mit.yaml"
    p.write_text("model:\n  backbone: mit_b0\n")
    mit = load_config(p)
    assert mit.method.feature == "decoder"
    assert load_config(None, ["model.backbone=mit_b1"]).method.feature == "decoder"
    # the file's backbone, then an override back to ResNet: the choice follows the final backbone
    assert load_config(p, ["model.backbone=resnet50"]).method.feature == "aspp_branches"
    with pytest.raises(ConfigError, match=r"^method\.feature=aspp_branches: model\.backbone=mit_b0"):
        load_config(p, ["method.feature=aspp_branches"])
    p.write_text("model:\n  backbone: mit_b0\nmethod:\n  feature: backbone\n")
    with pytest.raises(ConfigError, match=r"^method\.feature=backbone: model\.backbone=mit_b0"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^method\.feature=decoder: model\.backbone=resnet18"):
        load_config(None, ["method.feature=decoder"])
    # the saved config names the chosen feature and reads back the same
    dump_config(mit, tmp_path / "saved.yaml")
    assert "feature: decoder" in (tmp_path / "saved.yaml").read_text()
    assert load_config(tmp_path / "saved.yaml") == mit


def test_grad_checkpoint_key_reaches_both_segmentors():
    from bida.models import build_model

    assert load_config().model.grad_checkpoint is False
    for backbone in ("resnet18", "mit_b0"):
        for on in (False, True):
            cfg = load_config(None, [f"model.backbone={backbone}", f"model.grad_checkpoint={str(on).lower()}"])
            model = build_model(cfg.model, 3, cfg.method.feature)
            stages = model.backbone if backbone == "mit_b0" else model.layer3
            assert stages.grad_checkpoint is on
    with pytest.raises(ConfigError, match=r"model\.grad_checkpoint"):
        load_config(None, ["model.grad_checkpoint=2"])


def test_an_unknown_key_names_the_nearest_known_key_in_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.iter' in override 'train.iter=10' "
                                          r"\(did you mean 'train.iters'\?\)$"):
        load_config(None, ["train.iter=10"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'trian' in override .*\(did you mean 'train'\?\)$"):
        load_config(None, ["trian.iters=10"])
    bad = tmp_path / "c.yaml"
    bad.write_text("train: {iter: 10}\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.iter' \(did you mean 'train.iters'\?\)$"):
        load_config(bad)
    # nothing near: the section's keys, so that the user can pick
    with pytest.raises(ConfigError, match=r"'train.zzz' .*\(known in train: adapt_lr, amp, .*warmup_ratio, weight_decay\)$"):
        load_config(None, ["train.zzz=1"])

