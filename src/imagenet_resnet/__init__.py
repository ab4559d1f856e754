"""Train ResNets from scratch on ImageNet-1k, fast and dependably, and ship the result."""

__version__ = "0.1.0"
