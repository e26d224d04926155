import os

# Triton reads this when it is imported: CPU tensors then run the kernels in its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_cpu_path(monkeypatch):
    """Engine-level tests: CPU tensors take the fast torch path instead of the (slow) Triton
    interpreter, which the kernel tests cover."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
