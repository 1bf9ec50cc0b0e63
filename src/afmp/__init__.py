"""afmp: linear-time token mixers to train, ablate and benchmark.

import afmp
model = afmp.create_model("afmp_tiny", num_classes=10)
logits, aux = model(images, return_aux=True)
"""

from afmp import models  # noqa: F401  (registers the presets)
from afmp.registry import create_model, list_models, register_model
from afmp.training.checkpoint import load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "save_checkpoint"]
