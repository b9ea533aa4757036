"""Data I/O: everything between files on disk and batches of tensors.

- :mod:`bida.data.readers`: read the images and labels of each dataset layout (the layouts);
  :mod:`bida.data.listing` lists a split's samples, :mod:`bida.data.png` decodes 16-bit PNGs.
- :mod:`bida.data.transforms`: joint (image, label) transforms on numpy arrays.
- :mod:`bida.data.synthetic`: the embedded synthetic domain pair and its cache; its scenes are
  laid out by :mod:`bida.data.synthetic_layout` and painted by :mod:`bida.data.synthetic_render`.
- :mod:`bida.data.datasets`: datasets, domain resolution and the resumable infinite sampler.
- :mod:`bida.data.rare_class`: rare-class sampling of source images (``data.rare_class_sampling``).
- :mod:`bida.data.check`: walk a dataset and report every problem (``bida data check``).

May import only the shared modules (:mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint`,
:mod:`bida.labels`);
never :mod:`bida.method`, :mod:`bida.engine`, :mod:`bida.tools` or :mod:`bida.models`
(``tests/test_layering.py`` checks). The submodules are imported on use; importing the package
itself loads none of them.
"""
