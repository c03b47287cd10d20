"""lattn: train and evaluate vision models built on memory-efficient attention."""

__version__ = "0.1.0"
