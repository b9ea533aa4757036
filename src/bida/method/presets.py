"""Named presets: a list of config overrides applied after the config file and before the
user's own overrides (so a user's ``key=value`` still wins).

``paper`` is BiDA as published (docs/method.md). ``plus`` is the variant that won over paired
seeds on the embedded pair's target val (docs/results.md), chosen per path: the same losses with the contrast weighted more and each prototype set completed by
its moving average for the classes a batch lacks; on the rounds schedule (DeepLab-V2) the
contrast also waits 100 adaptation iterations (``loss.contrast_warmup_iters``), on the
mean-teacher schedule with a projection head (MiT) the head arrives trained from the source
stage (``method.pretrain_head``). The resolved
config of a run holds the resulting values, and ``run.json`` the preset's name.
"""

from __future__ import annotations

from ..errors import ConfigError

PRESETS: dict[str, tuple[str, ...]] = {
    "paper": (),
    "plus": (
        "method.memory_partners=true",  # every class meets its partner and all negatives, every batch
        "loss.contrast_t2s_weight=0.5",  # the paper's 0.2 leaves the contrast a minor term
        "loss.contrast_s2t_weight=0.5",
    ),
}
# What a preset adds on one path, the designs that won there (target val, 5 paired seeds):
# "rounds" is the offline-rounds schedule (DeepLab-V2), "teacher" the mean-teacher schedule
# with a projection head (method.feature decoder or backbone: MiT, DINOv2); any other config
# (the teacher schedule on ASPP features) gets the preset alone.
SCHEDULE_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "plus": {
        # the contrast counts from the 101st adaptation iteration
        "rounds": ("loss.contrast_warmup_iters=100",),
        # the head arrives trained by the source stage
        "teacher": ("method.pretrain_head=true",),
    },
}


def preset_overrides(name: str | None, path: str | None = None) -> list[str]:
    """The overrides of preset ``name`` (none for ``None``), with what it adds on ``path``
    (:data:`SCHEDULE_PRESETS`; None: the path-independent part only).

    Raises:
        ConfigError: unknown preset name.
    """
    if name is None:
        return []
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return list(PRESETS[name]) + list(SCHEDULE_PRESETS.get(name, {}).get(path or "", ()))


def preset_path(cfg) -> str | None:
    """The :data:`SCHEDULE_PRESETS` path of a config: ``rounds``, ``teacher`` for the
    mean-teacher schedule with a projection head, else None."""
    if cfg.train.schedule == "rounds":
        return "rounds"
    return "teacher" if cfg.method.feature != "aspp_branches" else None


def preset_overrides_for(name: str | None, cfg_path, overrides) -> list[str]:
    """:func:`preset_overrides` for the path of the config that ``cfg_path`` and ``overrides``
    (the user's) give."""
    if name is None or not any(SCHEDULE_PRESETS.get(name, {}).values()):
        return preset_overrides(name)
    from ..config import load_config

    return preset_overrides(name, preset_path(load_config(cfg_path, list(overrides))))
