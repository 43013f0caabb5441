"""Test-wide setup.

Without a GPU the Triton kernels run under the interpreter; TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, at collection time.
"""

import os

import torch

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
