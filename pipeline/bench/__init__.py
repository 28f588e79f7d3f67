"""Benchmarks: the train step alone (``step``), the data path (``data``) and short training
runs (``train``); ``python -m pipeline.bench --help``. Importing this package loads neither
Ray nor MLflow."""

from pipeline.bench.step import train_step_flops

__all__ = ["train_step_flops"]
