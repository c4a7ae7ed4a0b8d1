"""hemex shared code: data contract and I/O, preprocessing, synthetic cohorts, models, training, metrics."""

__version__ = "0.1.0"
