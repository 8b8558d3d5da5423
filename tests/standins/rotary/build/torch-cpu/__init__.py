"""Stand-in with kernels-community/rotary's calling convention (tests only)."""


def apply_rotary(x1, x2, cos, sin, out1, out2, conj):
    if conj:
        sin = -sin
    o1 = x1 * cos - x2 * sin
    o2 = x1 * sin + x2 * cos
    out1.copy_(o1)
    out2.copy_(o2)
