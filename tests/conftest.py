import os

import pytest
import torch

# The tests count replacements, which needs the pass to run: Inductor's caches would
# skip it on a hit. (test_config.py turns the caches back on in its subprocesses.)
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
# The tests replace patterns at tiny sizes: on a GPU, the rule that leaves launch-bound
# matches to Inductor would keep them (tests/test_launch_bound.py tests the rule itself).
os.environ.setdefault("HUBCOMPILE_MIN_ELEMENTS", "0")
# Bundled Triton kernels run on CPU tensors through Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh():
    """A clean Dynamo cache, hubcompile's records and settings."""
    import hubcompile

    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    hubcompile.reset_config()
    yield hubcompile.RECORDS
    torch._dynamo.reset()
    hubcompile.reset_config()


@pytest.fixture(autouse=True, scope="session")
def guard_cache_dir(tmp_path_factory):
    """Guard results go to a per-run directory, not the user's ~/.cache; traced patterns
    to one that the run's workers (and their subprocesses) share, so each pattern is
    traced about once per run, not once per process."""
    os.environ["HUBCOMPILE_CACHE_DIR"] = str(tmp_path_factory.mktemp("hubcompile-cache"))
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["HUBCOMPILE_PATTERN_CACHE_DIR"] = str(shared / "hubcompile-patterns")
    yield
