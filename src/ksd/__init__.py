"""ksd-run: reproducible comparisons of second-order optimizers for deep learning."""

__version__ = "0.1.0"
