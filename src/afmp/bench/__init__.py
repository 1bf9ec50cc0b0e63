"""`afmp bench`: what models cost as they scale, counted honestly and timed.

- ``scaling`` and ``pareto``: the studies; ``edge``: AFMP's edge stage alone;
- ``baselines``: timm's DeiT (fused and unfused attention), a FlexAttention
  neighbourhood ViT (bench-only, not in the model registry);
- ``compiled_bytes``: bytes a compiled step moves; ``plots``: the PNGs; ``cli``: the command.

The counting, timing and the device's peak are in afmp.measure, which training uses too.
"""
