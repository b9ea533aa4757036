"""bida.method.presets: what each preset adds to a schedule."""

from __future__ import annotations

from bida.config import load_config


def test_preset_plus_adds_the_designs_that_won_on_its_schedule():
    from bida.method.presets import preset_overrides, preset_overrides_for

    base = preset_overrides("plus")
    rounds, teacher = preset_overrides("plus", "rounds"), preset_overrides("plus", "teacher")
    assert "method.pretrain_head=true" in teacher and "method.pretrain_head=true" not in rounds
    assert "loss.contrast_warmup_iters=100" in rounds and "loss.contrast_warmup_iters=100" not in teacher
    assert set(base) <= set(rounds) and set(base) <= set(teacher)
    from bida.tools.demo import TRANSFORMER_DEMO_FILE

    mit = str(TRANSFORMER_DEMO_FILE)
    assert preset_overrides_for("plus", mit, []) == teacher
    cfg = load_config(mit, ["method=bida", *teacher])
    assert cfg.method.pretrain_head and cfg.method.memory_partners
    # DeepLab-V2: rounds, or the teacher schedule on ASPP features (no head): the preset alone
    assert preset_overrides_for("plus", None, []) == rounds and preset_overrides_for(None, None, []) == []
    assert preset_overrides_for("plus", None, ["train.schedule=teacher"]) == base
    assert preset_overrides_for("plus", None, ["train.schedule=teacher", "method.feature=backbone"]) == teacher
