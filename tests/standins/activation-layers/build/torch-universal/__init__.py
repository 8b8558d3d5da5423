"""Stand-in for kernels-community/activation's layers (tests only): elementwise ``Silu``,
``GeluTanh`` and the gated ``SiluAndMul``, as plain torch ops; ``layers.CALLS`` counts calls."""

from . import layers

__all__ = ["layers"]
