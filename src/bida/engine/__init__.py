"""The engine: everything that runs the method over data, and what it leaves on disk.

The loop and its parts:

- :mod:`bida.engine.train`: the :class:`~bida.engine.train.Trainer` loop and :func:`~bida.engine.train.train`;
  the only module that holds the trainer (``tests/test_layering.py`` checks).
- :mod:`bida.engine.state`: :class:`~bida.engine.state.RunState`, the run's progress.
- :mod:`bida.engine.schedules`: the phases of a run and the schedule of each kind (source
  stage, self-training rounds, mean teacher): what to build, what one step does, when it ends.
- :mod:`bida.engine.setup`: set-up of a run (seeding, the student, method state, the checks
  before the run directory exists).
- :mod:`bida.engine.checkpointer`: :class:`~bida.engine.checkpointer.Checkpointer`, the
  checkpoints (last, previous, best) and exact resume.
- :mod:`bida.engine.evaluator`: :class:`~bida.engine.evaluator.Evaluator`, when evaluations
  run, ``best.pt`` and the final ``metrics.json``.
- :mod:`bida.engine.round_labels`: :class:`~bida.engine.round_labels.RoundLabels`, the static
  pseudo labels of each round (generated, resumed, shared).
- :mod:`bida.engine.stop`: SIGINT/SIGTERM handling and stop messages.
- :mod:`bida.engine.runlog`: :class:`~bida.engine.runlog.RunLog`: ``log.jsonl``, TensorBoard
  and device-side log sums.
- :mod:`bida.engine.guard`: the finiteness guard of a step (skip and undo a non-finite step).
- :mod:`bida.engine.run_dir`: the run directory's checks, creation and lock.

What the loop uses:

- :mod:`bida.engine.inference`: sliding-window inference, confusion matrices, metrics files.
- :mod:`bida.engine.distributed`: torchrun process groups and bucketed collectives.
- :mod:`bida.engine.optim`: optimizers and learning-rate warm-up.

May import :mod:`bida.method`, :mod:`bida.models`, :mod:`bida.data` and the shared modules
(:mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint`); never :mod:`bida.tools`
(``tests/test_layering.py`` checks). The submodules are imported on use.
"""
