import os

import pytest
import torch

# Triton reads this when it is imported: without a GPU, CPU tensors then run the kernels in
# its interpreter. With a GPU the kernels run for real (the interpreter would hijack CUDA too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def torch_path():
    """torch_cpu_path for a whole module: a server or engine thread that outlives one test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture
def torch_cpu_path(monkeypatch):
    """Engine-level tests: CPU tensors take the fast torch path instead of the (slow) Triton
    interpreter, which the kernel tests cover."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
