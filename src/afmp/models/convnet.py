"""A timm convnet behind our interface: the anchor users know on an accuracy-cost plot.

The network is timm's own (``arch``, built without weights and without its classifier);
this family adds what every model in the registry has: a Config, ``return_aux``,
``example_input``, a ``head`` on average-pooled features, and input checks. Features
stay as timm gives them for a convnet, (B, C, H, W) maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from afmp.layers import ClassifierMixin, check_image_batch, make_head
from afmp.registry import check_positive_ints, register_model


class ConvNet(ClassifierMixin, nn.Module):
    @dataclass
    class Config:
        arch: str = "resnet10t"  # any timm convnet whose forward_features returns (B, C, H, W)
        img_size: int = 32
        in_chans: int = 3
        num_classes: int = 100
        drop_rate: float = 0.0  # dropout before the classifier
        # timm's ResNet default: each residual branch ends in a BatchNorm with zero scale, so
        # a block starts as the identity (and its branch gets no gradient at the first step).
        zero_init_last: bool = True

        def __post_init__(self):
            check_positive_ints(self, "img_size", "in_chans")
            check_positive_ints(self, "num_classes", minimum=0)
            if self.arch not in timm.list_models():
                raise ValueError(f"arch must be a timm model name, got {self.arch!r}")
            if not 0.0 <= self.drop_rate < 1.0:
                raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        kwargs = {"zero_init_last": cfg.zero_init_last} if cfg.arch.startswith(("resnet", "resnext")) else {}
        self.body = timm.create_model(
            cfg.arch, num_classes=0, global_pool="", in_chans=cfg.in_chans, **kwargs
        )
        self.num_features = self.body.num_features
        self.num_classes = cfg.num_classes
        self.global_pool = self.POOL
        self.drop = nn.Dropout(cfg.drop_rate)
        self.head = make_head(self.num_features, cfg.num_classes)
        # timm's pretrained_cfg names the first layer with weights (its stem's first conv).
        stem = next(n for n, m in self.body.named_modules() if isinstance(m, nn.Conv2d))
        self.first_conv = f"body.{stem}"

    def forward_features(self, x: torch.Tensor, return_aux: bool = False):
        check_image_batch(x, self.cfg.in_chans, 1)
        features = self.body.forward_features(x)
        return (features, {}) if return_aux else features  # no extra losses, nothing for viz

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean((2, 3)) if self.global_pool else features
        return pooled if pre_logits else self.head(self.drop(pooled))


# ResNet-10-T: timm's smallest ResNet (4.9M parameters, 40 MFLOPs at 28²).
register_model("convnet_resnet10t", ConvNet, data="cifar100", arch="resnet10t", img_size=32)
