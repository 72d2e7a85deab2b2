"""The version of ckpt, in one place: setuptools reads it statically, ``ckpt.__version__`` imports it."""

__version__ = "0.2.0"
