"""What users call: the command line and the programs behind its commands.

- :mod:`bida.tools.cli`: the ``bida`` command (``python -m bida``).
- :mod:`bida.tools.demo`: ``bida demo`` on the synthetic pair; :mod:`bida.tools.ablate`:
  ``bida ablate``; both run a grid of rows over paired seeds (:mod:`bida.tools.grid`) and
  summarise it in tables (:mod:`bida.tools.grid_tables`).
- :mod:`bida.tools.report`: ``bida report``, the HTML page comparing runs (what it reads:
  :mod:`bida.tools.report_runs`; its tables and figures: :mod:`bida.tools.report_tables`,
  :mod:`bida.tools.report_figures`).
- :mod:`bida.tools.predict`: ``bida predict`` and loading a model from a checkpoint.
- :mod:`bida.tools.segmenter`: :class:`bida.Segmenter`, prediction from Python (checkpoint,
  model folder or ONNX window model), on the evaluation's own loop.
- :mod:`bida.tools.export`: ``bida export`` (ONNX, ``torch.export``, model folders and their
  card); :mod:`bida.tools.export_spec`: its formats and opset, for the CLI's help.
- :mod:`bida.tools.features`: prototype alignment of source and target features.
- :mod:`bida.tools.launch`: ``bida launch``, a local multi-process launcher (torchrun's).

May import every other part of the package; nothing in the package imports it
(``tests/test_layering.py`` checks). The submodules are imported on use.
"""
