"""effcifar: fast CIFAR training, hyper-parameter search and one-shot architecture search."""

__version__ = "0.1.0"
