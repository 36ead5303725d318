"""prefixd: per-tenant prefix-tuning on one frozen language model."""

__version__ = "0.1.0"
