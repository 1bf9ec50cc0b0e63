"""One test over the whole registry: a model is covered the day it is registered."""

import pytest
import torch

import afmp


@pytest.mark.parametrize("name", afmp.list_models())
def test_registered_model_forward_backward(name):
    torch.manual_seed(0)
    model = afmp.create_model(name)
    assert model.model_name == name
    x = model.example_input(batch_size=2)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, model.num_classes)
    assert bool(torch.isfinite(logits).all())
    assert isinstance(aux, dict)
    loss = logits.float().square().mean() + aux.get("sparsity_loss", 0.0)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    # The timm-style interface every model has.
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_registry_lists_and_rejects():
    names = afmp.list_models()
    assert names == sorted(names) and {"afmp_tiny", "afmp_small"} <= set(names)
    assert afmp.list_models("small") == [n for n in names if "small" in n]
