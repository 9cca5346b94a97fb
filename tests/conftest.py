import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _loggers_as_found():
    """A script's main() run in-process (detect_live.main) gives its logger a handler bound to that test's
    captured stderr and stops propagation; restore both so a later test's caplog sees the logger again."""
    import logging

    saved = {n: (list(lg.handlers), lg.propagate, lg.level)
             for n in ("puad", "puad.live") for lg in [logging.getLogger(n)]}
    yield
    for n, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = handlers
        lg.propagate, lg.level = propagate, level


@pytest.fixture
def asd():
    """The real ASD dataset in ../shared; skips only when that folder is absent."""
    if not (DATASETS / "ASD").is_dir():
        pytest.skip("../shared/datasets/ASD is absent")
    return DATASETS / "ASD"


def args(tmp, data, *extra):
    return [f"--data={data}", "--preset=test", f"--ckpt={tmp}/puad.ckpt", f"--loss_csv={tmp}/loss.csv",
            "--max_train_windows=1536", "--lr=3e-3", *extra]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small model trained once per session on two real ASD entities (global stage)."""
    import train_safe

    if not (DATASETS / "ASD").is_dir():
        pytest.skip("../shared/datasets/ASD is absent")
    tmp = tmp_path_factory.mktemp("train")
    train_safe.main(args(tmp, DATASETS / "ASD", "--entities=omi-1,omi-2", "--stage=global", "--epochs=4"))
    return tmp, DATASETS / "ASD"


