"""The environment variables afmp reads, each in one place.

- ``AFMP_CACHE``: the folder for what afmp computes once and keeps (the roofline
  calibration, generated ListOps); default ``~/.cache/afmp``. ``AFMP_CACHE_DIR``, its
  old name, is still read.
- ``TRITON_INTERPRET=1``: Triton's interpreter, which runs the kernels on the CPU (tests).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(
        os.environ.get("AFMP_CACHE") or os.environ.get("AFMP_CACHE_DIR") or Path.home() / ".cache" / "afmp"
    )


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
