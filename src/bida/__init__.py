"""bida: unsupervised domain adaptive semantic segmentation with bi-directional
pixel-prototype contrast (BiDA, ECCV 2022) and the baselines it is compared with."""

__version__ = "0.1.0"
