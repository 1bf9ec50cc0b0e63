"""Measuring a step: FLOPs and bytes op by op as dispatched (counting), a timed step with
peak memory (timing), and the device's measured matmul peak and copy bandwidth, cached
(roofline). Below both training (MFU) and ``afmp bench`` (the studies), which use them."""
