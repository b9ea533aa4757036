"""The method: BiDA's pieces and the baselines', as pure tensor functions and small modules.

- :mod:`bida.method.prototypes`: class prototypes, the prototype memory (public path ``bida.prototypes``).
- :mod:`bida.method.losses`: segmentation, entropy and pixel-prototype contrast losses (``bida.losses``).
- :mod:`bida.method.pseudo_labels`: calibration, label transfer and fusion, and the round's
  class-balanced static labels (``bida.pseudo_labels``).
- :mod:`bida.method.train_step`: one source step and one adaptation step (the paper's iteration).
- :mod:`bida.method.teacher`: the mean teacher and its step; :mod:`bida.method.feature_distance`:
  DAFormer's ImageNet feature distance.
- :mod:`bida.method.mixing`: ClassMix and strong augmentation; :mod:`bida.method.masking`: masked image consistency.
- :mod:`bida.method.presets`: named method presets (``--preset``).

May import :mod:`bida.models`, :mod:`bida.data` and the shared modules (:mod:`bida.config`,
:mod:`bida.errors`, :mod:`bida.checkpoint`); never :mod:`bida.engine` or :mod:`bida.tools`
(``tests/test_layering.py`` checks). The submodules are imported on use.
"""
