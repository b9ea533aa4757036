"""Named presets: a list of config overrides applied after the config file and before the
user's own overrides (so a user's ``key=value`` still wins).

``paper`` is BiDA as published (docs/method.md). ``plus`` is the variant that won over seeds on
the embedded pair (README, "Does the contrast count?"): the same losses, with the
contrast weighted more and each prototype set completed by its moving average for the
classes a batch lacks. The resolved config of a run holds the resulting values, and
``run.json`` the preset's name.
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


def preset_overrides(name: str | None) -> list[str]:
    """The overrides of preset ``name`` (none for ``None``).

    Raises:
        ConfigError: unknown preset name.
    """
    if name is None:
        return []
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return list(PRESETS[name])
