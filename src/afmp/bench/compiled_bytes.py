"""Bytes a compiled step moves: inductor's own count of its generated kernels.

``counting`` counts eager PyTorch op by op: every op reads its inputs and writes its
outputs through memory. A compiled step fuses ops into kernels that keep intermediates
in registers, so its memory traffic is what inductor's kernels read and write. Inductor
counts that itself when its metrics log is on (``GraphLowering.count_bytes``: per
kernel, each buffer it touches at most once, its best case) and adds it to
``torch._inductor.metrics.num_bytes_accessed``. Each generated kernel runs once per
step, so the sum over a step's forward and backward graphs is the step's bytes.
"""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace


@contextlib.contextmanager
def compiled_bytes():
    """``with compiled_bytes() as counted: <first call of a compiled step>``; then
    ``counted.bytes``. Compiles inside go around inductor's caches, which skip the count."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config, metrics
    from torch._inductor.compile_fx import inductor_metrics_log

    counted = SimpleNamespace(bytes=0)
    level = inductor_metrics_log.level
    quiet = logging.Filter("nothing")  # the count is kept, the log line (a large dict) dropped
    inductor_metrics_log.setLevel(logging.INFO)
    inductor_metrics_log.addFilter(quiet)
    metrics.reset()
    try:
        with config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            yield counted
        counted.bytes = metrics.num_bytes_accessed
    finally:
        inductor_metrics_log.removeFilter(quiet)
        inductor_metrics_log.setLevel(level)
