"""WMTP: weighted multi-token prediction training. Runs the same on a laptop and under torchrun."""

__version__ = "0.1.0"
