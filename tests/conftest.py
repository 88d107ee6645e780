import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests/support: the shared helpers (tiny models, tokenizers, trainers)

import torch  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on two cores


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``BUPO_CACHE`` of the real-model tests: one folder for every xdist worker of a run, so each GGUF model is
    converted once per run (``bupo.models.prepare_model`` holds a lock while it converts; a second worker waits and
    then reuses the entry) whichever worker its tests land on. ``BUPO_TEST_CACHE`` names a persistent folder
    instead, to reuse a conversion between runs."""
    if os.environ.get("BUPO_TEST_CACHE"):
        return Path(os.environ["BUPO_TEST_CACHE"])
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own (pytest-of-USER/pytest-N/)
    path = root / "bupo_cache"
    path.mkdir(exist_ok=True)
    return path
