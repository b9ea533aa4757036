"""Typed, validated experiment configuration.

A config is a tree of frozen dataclasses. YAML files under ``configs/`` give one complete
experiment each (no inheritance); command-line overrides use ``dotted.key=value``, the
value parsed as YAML. Unknown keys, wrong types, values outside a ``Literal`` and numbers
outside their :data:`RANGES` entry fail with a :class:`~bida.errors.ConfigError` naming
the key. Nothing mutates a config after loading:
use :func:`replace_path` to derive a new one.

``method`` is both the name of the method and a section of options: ``method: bida`` in
YAML or ``method=bida`` on the command line set ``method.name``.

- :mod:`bida.config.schema`: the frozen dataclasses (:class:`Config` and its sections) and
  their defaults.
- :mod:`bida.config.checks`: the valid ranges (:data:`RANGES`) and the checks across keys.
- :mod:`bida.config.loading`: YAML 1.2 loading, overrides, :func:`load_config`,
  :func:`replace_path` and :func:`dump_config`.

Every name is importable from ``bida.config``. Shared by every layer: imports only
:mod:`bida.errors` and :mod:`bida.checkpoint` (``tests/test_layering.py`` checks).
"""

from __future__ import annotations

from ..errors import ConfigError
from .checks import (
    DECODER_BACKBONES,
    INF,
    MAX_SIDE,
    MAX_WORKERS,
    MIN_TEMPERATURE,
    MIT_MIN_CROP,
    RANGE_REASONS,
    RANGES,
    check_class_ids,
    check_contrast_designs,
    check_model_choices,
    check_ranges,
    check_schedule,
    check_test_split,
    default_feature,
    target_test_split,
)
from .loading import (
    dump_config,
    from_dict,
    load_config,
    parse_override,
    replace_path,
    to_dict,
    yaml_load,
)
from .schema import (
    DEFAULTS_FILE,
    CalibrationConfig,
    Config,
    DataConfig,
    DomainConfig,
    DomainKinds,
    EvalConfig,
    LossConfig,
    MethodConfig,
    Methods,
    MICConfig,
    HRDAConfig,
    ModelConfig,
    PseudoConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    # schema
    "DEFAULTS_FILE", "Methods", "DomainKinds", "SyntheticConfig", "DomainConfig", "DataConfig", "ModelConfig",
    "MethodConfig", "TrainConfig", "LossConfig", "PseudoConfig", "CalibrationConfig", "MICConfig", "HRDAConfig", "EvalConfig",
    "Config",
    # checks
    "INF", "MAX_SIDE", "MIN_TEMPERATURE", "MAX_WORKERS", "RANGES", "RANGE_REASONS", "check_ranges",
    "target_test_split", "check_test_split", "check_contrast_designs", "check_schedule", "check_class_ids",
    "MIT_MIN_CROP", "DECODER_BACKBONES", "default_feature", "check_model_choices",
    # loading
    "to_dict", "yaml_load", "parse_override", "from_dict", "load_config", "replace_path",
    "dump_config",
    # the error every check raises
    "ConfigError",
]
