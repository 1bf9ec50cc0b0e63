"""`afmp bench`: what models cost as they scale, counted honestly and timed.

- ``counting``: FLOPs (matmul and total) and bytes of one step, op by op as dispatched;
- ``timing``: CUDA events / perf_counter, peak memory, out-of-memory detection;
- ``roofline``: the device's measured matmul rate and copy bandwidth (cached);
- ``baselines``: timm's DeiT (fused and unfused attention), a FlexAttention
  neighbourhood ViT (bench-only, not in the model registry);
- ``scaling`` and ``pareto``: the studies; ``plots``: their PNGs; ``cli``: the command.
"""
