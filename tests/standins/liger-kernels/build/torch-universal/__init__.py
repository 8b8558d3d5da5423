"""Stand-in for kernels-community/liger-kernels (tests only): Hub layers in the layout and
conventions of the real repo (a noarch ``torch-universal`` build exporting ``layers``),
computed with plain torch ops so that tests can compare results. ``layers.CALLS`` counts
the calls of each layer's forward, so a test can tell that the layer ran."""

from . import layers

__all__ = ["layers"]
