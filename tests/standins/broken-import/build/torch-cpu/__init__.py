"""A repo whose import fails, as a build for another torch would (tests only)."""
raise ImportError("undefined symbol: _ZN3c1015SmallVectorBase (built for another torch)")
