"""Stand-in for kernels-community/rotary v2's layer ``apply_rotary_transformers`` (tests
only): transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` as a layer,
forward only like the real one; ``layers.CALLS`` counts calls."""

from . import layers

__all__ = ["layers"]
