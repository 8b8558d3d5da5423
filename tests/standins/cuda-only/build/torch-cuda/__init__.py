"""A repo that loads but exports none of the functions hubcompile needs (tests only)."""


def unrelated():
    return 0
