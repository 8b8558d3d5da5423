"""kernels-community/liger-kernels as a local Hub repo, built from the liger-kernel
package on PyPI: the noarch layout of the real repo (``build/torch-universal/`` with
``metadata.json``, ``__init__.py`` and ``layers.py``), whose layers (hub_layers/
liger_kernels.py) call liger's kernels. Nothing of liger is copied: the layers import the
installed package."""

import hashlib
import json
import shutil
from pathlib import Path

LAYERS = Path(__file__).parent / "hub_layers" / "liger_kernels.py"
REPO_ID = "kernels-community/liger-kernels"


def build(root: Path) -> Path:
    """Write the repo under ``root`` (its ``build/torch-universal``); returns ``root``."""
    variant = Path(root) / "build" / "torch-universal"
    variant.mkdir(parents=True, exist_ok=True)
    # The id is the module name kernels imports the repo as: one per built copy.
    metadata = {"name": "liger-kernels", "id": "_liger_kernels_" + hashlib.sha256(str(root).encode()).hexdigest()[:12], "version": 3,
                "license": "BSD-2-Clause", "python-depends": [], "backend": {"type": "cuda"}}
    (variant / "metadata.json").write_text(json.dumps(metadata))
    (variant / "__init__.py").write_text("from . import layers\n\n__all__ = [\"layers\"]\n")
    shutil.copyfile(LAYERS, variant / "layers.py")
    return Path(root)
