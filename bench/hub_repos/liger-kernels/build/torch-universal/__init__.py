"""kernels-community/liger-kernels, built from the liger-kernel package on PyPI (for the
GPU comparison in bench/kernel_mapping.py; the machine there has no Hub access). The
layers follow the Hub conventions: no ``__init__``, state read from the module they
replace, ``has_backward`` / ``can_torch_compile`` flags."""

from . import layers

__all__ = ["layers"]
