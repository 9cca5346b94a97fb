import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def asd():
    """The real ASD dataset in ../shared; skips only when that folder is absent."""
    if not (DATASETS / "ASD").is_dir():
        pytest.skip("../shared/datasets/ASD is absent")
    return DATASETS / "ASD"
