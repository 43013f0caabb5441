"""Test-wide setup.

The kernel cache lives in a temporary folder per test session. Without a GPU the Triton
kernels run under the interpreter; TRITON_INTERPRET must be set before any kernel module is
imported, so it is set here, at collection time.
"""

import atexit
import os
import shutil
import tempfile

import torch

# Kernels and autotune winners written by the tests go to a throw-away folder, never into the
# user's real cache (whose winners would also leak into the tests). Set before codegen loads.
_CACHE_DIR = tempfile.mkdtemp(prefix="sparse-forcing-tests-")
os.environ["SPARSE_FORCING_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI has 2 cores and runs kernels in the interpreter: few, deliberate examples.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.register_profile(
    "gpu",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_default_profile = "gpu" if torch.cuda.is_available() else "ci"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))

# Tiny CPU shapes: thread fan-out costs more than it gains (10-30x slower with 2 threads).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` is the one way to say a test needs CUDA: it is skipped without it."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
