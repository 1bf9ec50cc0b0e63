"""Test set-up shared by every test file.

Triton kernels are checked on the CPU through Triton's interpreter, which must be
switched on before any kernel is defined, so before afmp is imported. On a machine
with a GPU the kernels compile for real instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a shared CPU, OpenMP's spinning threads make
    small steps 10x slower (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
