"""bida.config.checks: a bad value is one line naming its key, refused before anything runs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from bida.config import load_config
from bida.engine.schedules import plan_phases
from bida.errors import ConfigError
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import MIXED, TEACHER, TINY_MIT, _one_line_error, folder_args, folder_pair, run_cli, train_args


@pytest.mark.parametrize("override, needle", [
    ("train.colour=3", "train.colour"),          # unknown key
    ("train.iters=many", "train.iters"),         # wrong type
    ("train.iters", "malformed override"),       # malformed override
])
def test_config_errors(tmp_path, capsys, override, needle):
    run_cli(tmp_path, train_args(tmp_path, [override]), capsys, needle)


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model:\n  depth: 50\n")
    run_cli(tmp_path, ["train", "-c", str(cfg), "--out", str(tmp_path / "run")], capsys, "model.depth")


@pytest.mark.parametrize("override", [
    "train.checkpoint_every=0", "train.eval_every=0", "train.log_every=0",  # were ZeroDivisionError
    "train.batch_size=0", "data.num_workers=-1", "train.lr=-1", "pseudo.class_fraction=2",
    "data.crop=[0,0]", "train.rounds=-1", "eval.max_images=0", "train.lr=.nan", "data.scale_range=[1.5,0.5]",
    "mic.mask_ratio=1",  # masks every block
])
def test_numeric_config_values_are_range_checked(tmp_path, capsys, override):
    # before: a traceback with a half-made run directory, or exit 0 with meaningless metrics
    run_cli(tmp_path, train_args(tmp_path, [override]), capsys, override.split("=")[0])


def test_every_numeric_config_key_has_a_range():
    import dataclasses
    import typing

    from bida.config import RANGES, Config

    def numeric_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                yield from numeric_keys(tp, key + ".")
            elif {int, float} & set(typing.get_args(tp) or (tp,)) or \
                    any({int, float} & set(typing.get_args(a)) for a in typing.get_args(tp)):
                yield key

    assert sorted(set(numeric_keys(Config)) - set(RANGES)) == []


@pytest.mark.parametrize("override, needle", [
    ("data.eval_classes=[99]", "data.eval_classes"),  # was an IndexError at the first evaluation
    ("data.eval_classes=[]", "data.eval_classes"),  # was mIoU 0.0
    ("data.eval_classes=[1,1]", "lists a class twice"),  # was a mean that counted class 1 twice
    ("model.width=.inf", "model.width"),  # was OverflowError
    ("train.lr=.inf", "train.lr"),  # was accepted
    ("loss.contrast_t2s_weight=-.inf", "loss.contrast_t2s_weight"),
    ("data.crop=[100000,100000]", "data.crop"),  # was a 27.9 GiB allocation in a worker
    ("data.resize=100000", "data.resize"),
    ("train.iters=1:30", "train.iters"),  # was 90 (YAML 1.1 sexagesimal)
    ("loss.temperature=1e-9", "swamps every other term"),  # was a total loss of 3e8
    ("data.num_workers=100000", "a process of its own"),  # forked hundreds of workers
])
def test_values_that_crashed_or_misled_later_are_refused_up_front(tmp_path, capsys, override, needle):
    src, tgt = folder_pair(tmp_path)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [override]), capsys, needle)
    assert not (tmp_path / "run").exists()


def test_numbers_are_read_as_yaml_1_2(tmp_path):
    from bida.config import load_config
    from bida.errors import ConfigError

    assert load_config(None, ["train.iters=010"]).train.iters == 10  # was 8 (YAML 1.1 octal)
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  iters: 010\n  log_every: 0o10\n  lr: 2.5e-4\n")
    cfg = load_config(path)
    assert (cfg.train.iters, cfg.train.log_every, cfg.train.lr) == (10, 8, 2.5e-4)
    path.write_text("train:\n  iters: 1:30\n")
    with pytest.raises(ConfigError, match="train.iters: expected an integer, got '1:30'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"seed: -1 is out of range \(must be in \[0, 4294967295\]\)"):
        load_config(None, ["seed=-1"])  # was printed as 4.29497e+09


@pytest.mark.parametrize("overrides, needle", [
    (["pseudo.ignore_top=-1"], "pseudo.ignore_top"),
    (["pseudo.ignore_bottom=-3"], "pseudo.ignore_bottom"),
    (["pseudo.ignore_top=4", "pseudo.ignore_bottom=4"], "pseudo.ignore_top + pseudo.ignore_bottom"),  # crop height 8
    (["pseudo.ignore_top=8"], "pseudo.ignore_top + pseudo.ignore_bottom"),
    (["train.mix_classes=daformer"], "train.mix_classes"),
    (["loss.source_ce_mean=pixels"], "loss.source_ce_mean"),
    (["method.target_features=mixed"], "method.target_features"),  # self_training has no BiDA target pixels
    (["method.target_features=both"], "method.target_features"),
])
def test_daformer_recipe_keys_are_refused_up_front(tmp_path, capsys, overrides, needle):
    src, tgt = folder_pair(tmp_path)
    teacher = ["train.schedule=teacher", "method=self_training"]
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + teacher + overrides), capsys, needle)


@pytest.mark.parametrize("override, needle", [
    ("train.warmup_ratio=0", "train.warmup_ratio"),  # the warm-up would start at LR 0
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("model.input_scale=0", "model.input_scale"),
    ("model.input_scale=1.1", "model.input_scale"),  # a DeepLab-V2 backbone has no ViT input
    ("model.decoder=light", "model.decoder"),
    ("train.decay_norms_biases=true", "train.decay_norms_biases"),
    ("pseudo.teacher_flip=true", "pseudo.teacher_flip"),  # the rounds schedule has no teacher
    ("data.weak_jitter=true", "data.weak_jitter"),
])
def test_vfm_uda_switches_are_refused_where_nothing_reads_them(tmp_path, capsys, override, needle):
    src, tgt = folder_pair(tmp_path)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [override]), capsys, needle)
    assert not (tmp_path / "run").exists()


def test_an_unknown_class_weighting_is_one_line_naming_the_key(tmp_path, capsys):
    from bida.tools.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "loss.class_weights=inverse_freq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.class_weights" in err and "inverse_sqrt_freq" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- config
def test_contrast_design_keys_are_checked():
    for bad, match in ((["method=self_training", "loss.contrast_warmup_iters=5"], "loss.contrast_warmup_iters"),
                       (["method=bida", "loss.contrast_warmup_iters=-1"], "loss.contrast_warmup_iters"),
                       (["method=bida", "method.pretrain_head=true"], "aspp_branches"),
                       (["method=self_training", "method.pretrain_head=true", "method.feature=backbone"],
                        "method.pretrain_head")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)
    load_config(None, ["method=source_only", "method.pretrain_head=true", "method.feature=backbone"])


@pytest.mark.parametrize("override, needle", [
    ("model.hrda.detail_crop=[128,32]", "model.hrda.detail_crop: [128, 32] is larger than the context crop"),
    ("model.hrda.crop_divisible=4", "model.hrda.crop_divisible: 4 must be a multiple of 8"),
    ("data.crop=[60,64]", "data.crop: [60, 64] must be a multiple of 8"),
    ("model.hrda.detail_crop=[36,36]", "model.hrda.detail_crop: [36, 36] must be a multiple of 8"),
    ("model.hrda.context_scale=0.3", "model.hrda.context_scale: 0.3"),
    ("model.backbone=resnet18", "model.hrda.crop_divisible: 8 must be a multiple of 16"),
    ("train.student_forwards=joint", "model.hrda.enabled: each student forward draws its own detail crop"),
    ("train.source_iters=10", "model.hrda.enabled: HRDA trains on the mean-teacher schedule"),
    ("method.name=source_only", "model.hrda.enabled: HRDA trains on the mean-teacher schedule"),
    ("model.hrda.detail_loss_weight=1", "model.hrda.detail_loss_weight"),
])
def test_bad_hrda_settings_fail_at_load(override, needle):
    with pytest.raises(ConfigError, match="^" + re.escape(needle)):
        load_config(None, [*TINY_MIT, override])


TINY_DLV2 = ["model.backbone=resnet18", "model.width=0.125", "train.schedule=teacher", "method.name=self_training",
             "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
             "model.hrda.detail_crop=[32,32]", "model.hrda.crop_divisible=16"]


def test_hrda_takes_deeplabv2_on_crops_of_whole_16_pixel_units():
    """DeepLab-V2's 8 input pixels a cell at context scale 0.5: every crop side a multiple of 16."""
    assert load_config(None, TINY_DLV2).model.hrda.enabled
    for override, needle in (
            ("model.hrda.detail_crop=[40,40]", "model.hrda.detail_crop: [40, 40] must be a multiple of 16"),
            ("data.crop=[72,64]", "data.crop: [72, 64] must be a multiple of 16"),
            ("model.hrda.crop_divisible=8", "model.hrda.crop_divisible: 8 must be a multiple of 16")):
        with pytest.raises(ConfigError, match="^" + re.escape(needle)):
            load_config(None, [*TINY_DLV2, override])


def test_pseudo_margins_config_checks():
    with pytest.raises(ConfigError, match=r"^pseudo\.margins: the image margins .* replace the crop bands"):
        load_config(None, [*TINY_MIT, "pseudo.margins=[1,2,1,1]", "pseudo.ignore_top=3"])
    with pytest.raises(ConfigError, match=r"^pseudo\.margins: only the teacher schedule"):
        load_config(None, ["pseudo.margins=[1,2,1,1]"])
    with pytest.raises(ConfigError, match=r"^pseudo\.margins\[1\]: -2 is out of range"):
        load_config(None, [*TINY_MIT, "pseudo.margins=[1,-2,1,1]"])


@pytest.mark.parametrize("override", ["train.iters=0", "train.iters_per_round=0", "train.rounds=-1",
                                      "train.max_bad_steps=0"])
def test_counts_are_validated_before_anything_is_created(tmp_path, capsys, tiny_overrides, override):
    # before: train.iters=0 hung forever (a phase of 0 iterations never ended) and ignored SIGTERM
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=bida", override]) == 2
    assert override.split("=")[0] in _one_line_error(capsys)
    assert not run.exists()


def test_exponent_floats_are_accepted_where_the_key_is_a_float(tmp_path):
    # before: YAML 1.1 reads 1e-3 and 1e6 (no dot) as strings: "expected a number, got '1e-3'"
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=1e6", "train.adapt_lr=7.5E-5"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.adapt_lr) == (1e-3, 1e6, 7.5e-5)
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_config(path).train.lr == 1e-3
    with pytest.raises(Exception, match="train.iters"):  # ints and strings are unchanged
        load_config(None, ["train.iters=1e3"])


def test_target_features_is_checked(tiny_overrides):
    assert load_config(None, tiny_overrides + TEACHER + ["method=bida"]).method.target_features == "unmixed"
    assert load_config(None, tiny_overrides + TEACHER + MIXED).method.target_features == "mixed"
    with pytest.raises(ConfigError, match="method.target_features"):
        load_config(None, tiny_overrides + MIXED)  # the rounds schedule has no ClassMix crop
    for method in ("self_training", "source_only"):
        with pytest.raises(ConfigError, match="method.target_features"):
            load_config(None, tiny_overrides + TEACHER + [f"method={method}", "method.target_features=mixed"])
    with pytest.raises(ConfigError, match="target_features"):
        load_config(None, tiny_overrides + TEACHER + ["method=bida", "method.target_features=both"])


def test_teacher_phases_and_config_errors(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", *TEACHER, "train.source_iters=3"])
    assert [(p.kind, p.iters) for p in plan_phases(cfg)] == [("source", 3), ("teacher", 4)]
    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER])
    assert [(p.kind, p.iters) for p in plan_phases(cfg)] == [("teacher", 4)]
    with pytest.raises(ConfigError, match="minent"):
        load_config(None, ["method=minent", "train.schedule=teacher"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["method=bida", "train.schedule=teacher", "loss.feature_distance_weight=0.005"])
    with pytest.raises(ConfigError, match="train.schedule=teacher"):
        load_config(None, ["method=bida", "loss.feature_distance_weight=0.005", "model.pretrained=x.pth"])


def test_teacher_bn_config(tiny_overrides):
    assert load_config(None, ["train.schedule=teacher", "method=self_training"]).train.teacher_bn == "running"
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.teacher_bn=batch"])
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.schedule=teacher", "method=self_training", "train.teacher_bn=batch",
                           "model.freeze_bn=true"])
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.schedule=teacher", "method=self_training", "train.teacher_bn=eval"])


def test_daformer_keys_are_checked(tiny_overrides):
    base = ["train.schedule=teacher", "method=self_training", "data.crop=[32,64]"]
    assert load_config(None, base + ["pseudo.ignore_top=15", "pseudo.ignore_bottom=16"]).pseudo.ignore_bottom == 16
    for over, needle in [(["pseudo.ignore_top=16", "pseudo.ignore_bottom=16"], "pseudo.ignore_top + pseudo.ignore_bottom"),
                         (["pseudo.ignore_top=-1"], "pseudo.ignore_top"),
                         (["pseudo.ignore_bottom=-2"], "pseudo.ignore_bottom"),
                         (["train.mix_classes=daformer"], "train.mix_classes"),
                         (["loss.source_ce_mean=mean"], "loss.source_ce_mean")]:
        with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
            load_config(None, base + over)
    for key in ("pseudo.ignore_top=1", "pseudo.ignore_bottom=1", "train.mix_classes=batch"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, [key])  # the rounds schedule reads none of them
    assert load_config(None, ["loss.source_ce_mean=all"]).loss.source_ce_mean == "all"  # every schedule


def test_teacher_flip_and_weak_jitter_config(tiny_overrides):
    base = ["train.schedule=teacher", "method=self_training"]
    cfg = load_config(None, base)
    assert cfg.pseudo.teacher_flip is False and cfg.data.weak_jitter is False
    assert load_config(None, base + ["pseudo.teacher_flip=true", "data.weak_jitter=true"]).pseudo.teacher_flip
    for key in ("pseudo.teacher_flip", "data.weak_jitter"):
        for other in (["method=self_training"], ["train.schedule=teacher", "method=source_only"]):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
                load_config(None, other + [f"{key}=true"])
            assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["data.synthetic.num_test=0", "data.target.test_split=test"], "data.target.test_split"),
    (["data.target.test_split=val"], "data.target.test_split"),
    (["data.source.test_split=test"], "data.source.test_split"),
    (["data.synthetic.num_test=-1"], "data.synthetic.num_test"),
])
def test_bad_test_split_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)
