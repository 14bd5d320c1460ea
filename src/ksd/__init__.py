"""ksd-run: reproducible comparisons of second-order optimizers for deep learning."""

from ksd import scale as _scale  # noqa: F401  registers the ${by_scale:cpu,paper} config resolver

__version__ = "0.1.0"
