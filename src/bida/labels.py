"""Public path of the label tables: ``bida.labels`` is :mod:`bida.data.labels`.

The module lives with the rest of the data I/O in :mod:`bida.data`; importing ``bida.labels``
binds that very module object here, so ``import bida.labels``, ``from bida.labels import X``
(private names included) and ``bida.labels.X`` all reach one module.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("bida.data.labels")
