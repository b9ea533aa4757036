"""The engine: everything that runs the method over data, and what it leaves on disk.

- :mod:`bida.engine.train`: the :class:`~bida.engine.train.Trainer` loop and :func:`~bida.engine.train.train`.
- :mod:`bida.engine.evaluate`: sliding-window inference, confusion matrices, metrics files.
- :mod:`bida.engine.round_labels`: the per-round static pseudo-label cache.
- :mod:`bida.engine.distributed`: torchrun process groups and bucketed collectives.
- :mod:`bida.engine.optim`: optimizers and learning-rate schedules.
- :mod:`bida.engine.weights`: pretrained and checkpoint weights into a model.
- :mod:`bida.engine.launch`: ``bida launch``, a local multi-process launcher.

May import :mod:`bida.method`, :mod:`bida.models`, :mod:`bida.data` and the shared modules
(:mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint`); never :mod:`bida.tools`
(``tests/test_layering.py`` checks). The submodules are imported on use.
"""
