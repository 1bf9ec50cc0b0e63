"""One test over the whole registry: a model is covered the day it is registered."""

import dataclasses

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import afmp
from afmp.models.afmp import AFMP
from afmp.training.losses import auxiliary_loss

IMAGE_MODELS = [n for n in afmp.list_models() if hasattr(afmp.create_model(n).cfg, "img_size")]


@pytest.mark.parametrize("name", afmp.list_models())
def test_registered_model_forward_backward(name):
    torch.manual_seed(0)
    # Stochastic depth can drop a whole block for a batch of two: off, so every weight is reached.
    # A ResNet's zero-initialised last norm per block cuts its branch off at the first step: off too.
    fields = afmp.registry.config_fields(type(afmp.create_model(name)))
    no_drop = {k: v for k, v in (("drop_path_rate", 0.0), ("zero_init_last", False)) if k in fields}
    model = afmp.create_model(name, **no_drop)
    assert model.model_name == name
    x = model.example_input(batch_size=2)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (2, model.num_classes)
    assert bool(torch.isfinite(logits).all())
    assert isinstance(aux, dict)
    loss = logits.float().square().mean() + auxiliary_loss(aux, logits)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    # Structurally dead: in a Ripple ViT's last block only the class token reaches the head,
    # and the ripple expansion is added to grid tokens alone.
    last = f"blocks.{len(getattr(model, 'blocks', [])) - 1}.attn.expand."
    zero_grad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(p.grad.any()) and not n.startswith(last)
    ]
    assert not zero_grad, f"parameters the loss does not reach: {zero_grad}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", afmp.list_models())
def test_timm_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()  # through timm's own factory
    cfg = model.pretrained_cfg
    # The names it gives are real layers with weights.
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_submodule(cfg["classifier"]).weight.shape == (model.num_classes, model.num_features)
    assert model.get_submodule(cfg["first_conv"]).weight.requires_grad
    assert cfg["num_classes"] == model.num_classes and cfg["architecture"] == name
    x = model.example_input(batch_size=2)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size) and model.head_hidden_size == model.num_features
        torch.testing.assert_close(model.get_classifier()(pooled), logits)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pooled)  # no classifier: pooled features out
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.pretrained_cfg["classifier"] == "head"
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, "max")


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_unpooled_features_and_num_classes_zero(name):
    torch.manual_seed(0)
    family = name.split("_")[0]
    # At 32² a ResNet's last map is 1x1, where every pooling agrees: 64² leaves it 2x2.
    model = afmp.create_model(name, **({"img_size": 64} if family == "convnet" else {})).eval()
    x = model.example_input(batch_size=2)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        # The pooling each family documents: the token mean then the readout norm (AFMP), the
        # mean over the (B, C, H, W) map (convnet), the class token (ViTs).
        expected = {
            "afmp": lambda: model.norm(features.mean(1)),
            "convnet": lambda: features.mean((2, 3)),
        }.get(family, lambda: features[:, 0])()
        assert model.POOL == ("avg" if family in ("afmp", "convnet") else "token")
        torch.testing.assert_close(pooled, expected)
        model.reset_classifier(0, "")  # as timm: no pooling, no classifier
        assert model(x).shape == features.shape and features.dim() == (4 if family == "convnet" else 3)
        headless = afmp.create_model(
            name, num_classes=0, **({"img_size": 64} if family == "convnet" else {})
        ).eval()
        headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
        torch.testing.assert_close(headless(x), pooled)


def test_pretrained_cfg_gives_timm_the_data_each_preset_is_made_for():
    expected = {
        "afmp_tiny": ((3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        "afmp_small": ((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        "ripple_vit_tin": ((3, 64, 64), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    }
    for name, (size, mean, std) in expected.items():
        data = resolve_model_data_config(timm.create_model(name))
        assert (data["input_size"], data["mean"], data["std"]) == (size, mean, std), name
    # It follows the model that was built, not only the preset.
    model = afmp.create_model("afmp_tiny", img_size=48, num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48) and model.pretrained_cfg["num_classes"] == 10
    assert afmp.create_model("diffusion_text").pretrained_cfg["first_conv"] == "embed"


def test_pretrained_cfg_of_an_image_a_point_set_and_a_text_preset_in_full():
    """Every key timm reads: an image model gets its input size, bicubic interpolation, no
    crop, its first layer and its data set's statistics (CIFAR-100's for AFMP-Tiny) while its
    channels match them; a point-set model its features and position size; a text model its
    sequence length and vocabulary; each its classes and head."""
    common = {"classifier": "head", "license": "mit", "tag": "", "hf_hub_id": None, "url": None}
    image = {
        "architecture": "afmp_tiny",
        "num_classes": 100,
        **common,
        "input_size": (3, 32, 32),
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
    }
    cifar100 = {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
    cfg = afmp.registry.resolve_config("afmp_tiny")
    assert afmp.registry.pretrained_cfg("afmp_tiny", cfg) == {**image, **cifar100}
    # One channel: CIFAR-100's three means do not apply, so none is given.
    gray = afmp.registry.resolve_config("afmp_tiny", in_chans=1)
    assert afmp.registry.pretrained_cfg("afmp_tiny", gray) == {**image, "input_size": (1, 32, 32)}
    points = afmp.registry.resolve_config("afmp_points")
    assert afmp.registry.pretrained_cfg("afmp_points", points) == {
        "architecture": "afmp_points",
        "num_classes": 10,
        **common,
        "first_conv": "embed",
        "in_features": 3,
        "pos_dim": 2,
    }
    text = afmp.registry.resolve_config("diffusion_text")
    assert afmp.registry.pretrained_cfg("diffusion_text", text) == {
        "architecture": "diffusion_text",
        "num_classes": 2,
        **common,
        "first_conv": "embed",
        "max_len": 4096,
        "vocab_size": 257,
    }


def test_resolve_config_names_the_model_whose_option_has_the_wrong_type():
    """An option of the wrong type is refused with the model's name; valid ones override the preset."""
    with pytest.raises(
        ValueError, match="^option sparsity of model 'afmp_tiny' must be a finite number, got 'high'$"
    ):
        afmp.registry.resolve_config("afmp_tiny", sparsity="high")
    cfg = afmp.registry.resolve_config("afmp_tiny", sparsity=0.5)
    assert (cfg.sparsity, cfg.patch_size, cfg.num_classes) == (0.5, 8, 100)


@pytest.mark.parametrize("name", afmp.list_models())
def test_compiles_without_a_graph_break(name):
    torch.manual_seed(0)
    # Smaller shapes of the same code, to keep this fast: afmp_small at 128² (8x8 tokens, the
    # same stencil backend as at 224²), 12-block ViTs with 2 blocks (every block is the same).
    fields = afmp.registry.config_fields(type(afmp.create_model(name)))
    small = {"img_size": 128} if name == "afmp_small" else {"depth": 2} if "depth" in fields else {}
    model = afmp.create_model(name, **small).eval()
    x = model.example_input(batch_size=2)
    torch._dynamo.reset()
    # PyG's peers (graph_*) pack each batch's valid nodes into one graph, a size that depends
    # on the data, where dynamo breaks the graph: they must compile to the same function.
    fullgraph = not name.startswith("graph_")
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")  # fullgraph: a break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", afmp.list_models())
def test_save_and_load_reproduce_the_logits(name, tmp_path):
    torch.manual_seed(0)
    model = afmp.create_model(name, num_classes=7).eval()
    afmp.save_checkpoint(model, tmp_path)
    loaded = afmp.load_checkpoint(tmp_path).eval()
    assert loaded.model_name == name and dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg)
    x = model.example_input(batch_size=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_built_from_its_class_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = AFMP(AFMP.Config(num_classes=7, d_model=64, num_layers=2)).eval()
    afmp.save_checkpoint(model, tmp_path)
    loaded = afmp.load_checkpoint(tmp_path).eval()
    assert loaded.model_name == "afmp_tiny"  # the class's first preset, with the saved config
    x = model.example_input(batch_size=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_registry_lists_and_rejects():
    names = afmp.list_models()
    assert names == sorted(names)
    assert afmp.list_models("afmp_*") == ["afmp_points", "afmp_small", "afmp_tiny", "afmp_tiny_dense"]
    assert afmp.list_models("*_vit_t?n") == ["hydra_bolya_vit_tin", "hydra_vit_tin", "ripple_vit_tin"]
    assert afmp.list_models("small") == ["afmp_small"]  # no wildcard: a substring
    assert afmp.list_models("nothing*") == []
    with pytest.raises(
        ValueError, match="unknown model 'afmp_huge'; registered models: afmp_points, afmp_small"
    ):
        afmp.create_model("afmp_huge")
    with pytest.raises(ValueError, match="unknown option\\(s\\) d_modle for model 'afmp_tiny'"):
        afmp.create_model("afmp_tiny", d_modle=64)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0, got -1"):
        afmp.create_model("afmp_tiny", num_classes=-1)
    with pytest.raises(ValueError, match="model 'afmp_tiny' is already registered"):
        afmp.register_model("afmp_tiny", AFMP)


@pytest.mark.parametrize(
    ("img_size", "patch_size"),
    [(8, 2), (28, 7), (30, 6), (11, 11), (5, 1), (64, 16)],
)
def test_data_fitting_keeps_afmp_tinys_4x4_grid_as_near_as_the_divisors_allow(img_size, patch_size):
    """AFMP-Tiny is 32/8, a 4x4 grid: the patch is the divisor of the image size whose grid is
    nearest 4, the smaller patch on a tie (30: 6 gives 5 and 10 gives 3); a prime size
    has only 1 and itself (11: a grid of 11 is 7 away, of 1 is 3; 5: a grid of 5 is 1 away)."""
    data = {"img_size": img_size, "in_chans": 1, "num_classes": 10, "not_a_field": 0}
    args = afmp.registry.model_args_for_data("afmp_tiny", data, {})
    assert args == {"img_size": img_size, "in_chans": 1, "num_classes": 10, "patch_size": patch_size}


def test_data_fitting_leaves_the_patch_to_a_user_who_names_the_size_or_the_patch():
    data = {"img_size": 28, "in_chans": 1, "num_classes": 10}
    assert afmp.registry.model_args_for_data("afmp_tiny", data, {"img_size": 56}) == {**data, "img_size": 56}
    assert afmp.registry.model_args_for_data("afmp_tiny", data, {"patch_size": 4}) == {
        **data,
        "patch_size": 4,
    }
    # A model without patches (the ConvNet) gets none, whatever the image size.
    assert afmp.registry.model_args_for_data("convnet_resnet10t", data, {}) == data
    text = {"vocab_size": 99, "num_classes": 4, "max_len": 10}  # no img_size: a sequence model's fields pass
    assert afmp.registry.model_args_for_data("diffusion_text", text, {"num_iters": 2}) == {
        **text,
        "num_iters": 2,
    }
