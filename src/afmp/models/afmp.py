"""AFMP: Attention-Free Modular Perception, with the semantics of docs/model.md.

Tokens exchange messages over a static scaffold (padded neighbour lists), through
gates computed by a predictive router; a Perceptual Capsule Unit (PCU) updates
each token; a top-down pass refines the states and the readout consumes them.

Per-token formulation: every linear map acts on one endpoint of an edge, so one
wide GEMM per layer computes ``[W_self | W_msg | W_q | W_k | A | B] h`` for each
token, and the per-edge stage (afmp.ops) only gathers and does elementwise work.

Letters: B batch, N tokens, K neighbour slots, D d_model, R k_dim, F score_hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from afmp import scaffold as scaffolds
from afmp.layers import ClassifierMixin, PatchEmbed, check_image_batch, grid_centres, make_head
from afmp.ops import edge_backend_names, select_edge_backend
from afmp.ops.edge import LayerWeights
from afmp.registry import check_one_of, check_positive_ints, register_model


class RouterPCULayer(nn.Module):
    """One AFMP layer: predictive router (scores, per-image top-k, gates) and PCU update."""

    def __init__(
        self,
        *,
        d_model: int,
        k_dim: int,
        score_hidden: int,
        sparsity: float,
        predictive: bool,
    ):
        super().__init__()
        self.sparsity = sparsity
        self.split = (d_model, d_model, k_dim, k_dim, score_hidden, score_hidden)
        # [W_self | W_msg | W_q | W_k | A | B]: A and B are v's first layer on h_i and h_j.
        self.proj = nn.Linear(d_model, sum(self.split))
        self.U = nn.Parameter(torch.randn(k_dim, k_dim) * 0.02)
        # v's first-layer weights on the two scalar edge features, initialised as nn.Linear
        # would for its fan-in of 2D + 2.
        bound = (2 * d_model + 2) ** -0.5
        self.w_len = nn.Parameter(torch.empty(score_hidden).uniform_(-bound, bound))
        # The first layer has no predictive signal (its error is 0), so no W_pred either.
        self.pred = nn.Linear(d_model, d_model) if predictive else None  # W_pred, on t_i
        self.w_err = nn.Parameter(torch.empty(score_hidden).uniform_(-bound, bound)) if predictive else None
        self.score_out = nn.Linear(score_hidden, 1)  # v's second layer
        self.gate = nn.Linear(1, d_model)  # g = sigmoid(w_g * s + b_g)

    def weights(self) -> LayerWeights:
        pred = self.pred
        return LayerWeights(
            self.proj.weight,
            self.proj.bias,
            self.U,
            self.w_len,
            None if pred is None else pred.weight,
            None if pred is None else pred.bias,
            self.w_err,
            self.score_out.weight.view(-1),
            self.score_out.bias.view(()),
            self.gate.weight.view(-1),
            self.gate.bias,
        )

    def forward(self, h, t, sc: scaffolds.Scaffold, backend):
        """(new states, gate means); ``sc`` is what ``backend.prepare`` made of the scaffold."""
        return backend.layer(h, t, self.weights(), sc, self.sparsity)


def afmp_stack(cfg) -> tuple[nn.ModuleList, nn.ModuleList, nn.Module]:
    """AFMP's layers, top-down maps and readout norm for a config with AFMP's fields: what
    ``run_levels`` and the readout use, shared by the grid model and the point-set model."""
    layers = nn.ModuleList(
        RouterPCULayer(
            d_model=cfg.d_model,
            k_dim=cfg.k_dim,
            score_hidden=cfg.score_hidden,
            sparsity=cfg.sparsity,
            predictive=l > 0,  # layer 1 has no output of layer l-2 to predict from
        )
        for l in range(cfg.num_layers)
    )
    # Level l is refined by level l+1: s_l <- s_l + W_t (s_{l+1}) (levels share one token set).
    n_top_down = cfg.num_layers - 1 if cfg.use_top_down else 0
    top_down = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model) for _ in range(n_top_down))
    norm = nn.LayerNorm(cfg.d_model) if cfg.readout_norm else nn.Identity()
    return layers, top_down, norm


def run_levels(model: nn.Module, h: torch.Tensor, sc, backend) -> tuple[list[torch.Tensor], list]:
    """AFMP's bottom-up and top-down passes over embedded tokens ``h`` (B, N, D), for any
    model with AFMP's ``cfg``, ``layers`` and ``top_down`` (the grid model here, the point-set
    model in afmp.models.points): (each level's states after the top-down pass, each
    layer's gate means (B, N, K)). The readout takes level 0 with the top-down pass, else
    the top level."""
    # Bottom-up: layer l reads H = output of layer l-1 and the predictive signal
    # T = output of layer l-2 (the embedding counts as output 0; the first layer has none).
    states, gate_means = [h], []
    sc = backend.prepare(sc, h)  # what every layer reads of the scaffold, derived once
    for layer in model.layers:
        h, gate_mean = layer(states[-1], states[-2] if len(states) >= 2 else None, sc, backend)
        states.append(h)
        gate_means.append(gate_mean)
    levels = states[1:]
    # Top-down: from the top level down, so that the bottom level is refined by every higher one.
    if model.cfg.use_top_down:
        for l in range(len(levels) - 2, -1, -1):
            levels[l] = levels[l] + model.top_down[l](levels[l + 1])
    return levels, gate_means


def mean_gate(gate_means: list[torch.Tensor], num_edges) -> torch.Tensor:
    """Each layer's mean gate over ``num_edges`` real edges (gates are exactly 0 elsewhere),
    averaged over layers: what the sparsity loss weighs."""
    return torch.stack([g.sum() for g in gate_means]).mean() / num_edges


class AFMP(ClassifierMixin, nn.Module):
    @dataclass
    class Config:
        img_size: int = 32
        patch_size: int = 8
        in_chans: int = 3
        num_classes: int = 100
        num_layers: int = 4
        d_model: int = 128
        k_dim: int = 64  # rank of the router's bilinear term
        score_hidden: int = 64  # hidden width of the score MLP v
        sparsity: float = 0.3  # fraction of each image's edges pruned; 0 = dense
        lambda_sparse: float = 1e-4
        use_top_down: bool = True
        readout_norm: bool = True  # LayerNorm on the pooled state before the linear head
        scaffold: str = "delaunay"  # layout of the token grid: see afmp.scaffold.LAYOUTS
        window_radius: int = 1  # the "window" scaffold's: offsets with max(|dy|, |dx|) <= radius
        backend: str = "auto"  # per-edge stage: see afmp.ops

        def __post_init__(self):
            check_positive_ints(
                self,
                "img_size",
                "patch_size",
                "in_chans",
                "num_layers",
                "d_model",
                "k_dim",
                "score_hidden",
                "window_radius",
            )
            check_positive_ints(self, "num_classes", minimum=0)  # 0: no classifier, features out
            if self.img_size % self.patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity is the fraction of edges pruned, in [0, 1); got {self.sparsity}")
            if self.lambda_sparse < 0:
                raise ValueError(f"lambda_sparse must be >= 0, got {self.lambda_sparse}")
            check_one_of(self, "scaffold", scaffolds.LAYOUTS)
            check_one_of(self, "backend", edge_backend_names())

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.d_model
        self.num_classes = cfg.num_classes
        self.patch_embed = PatchEmbed(in_chans=cfg.in_chans, dim=cfg.d_model, patch_size=cfg.patch_size)
        self.pos_embed = nn.Linear(2, cfg.d_model)  # embeds the normalised patch centre
        self.layers, self.top_down, self.norm = afmp_stack(cfg)
        self.global_pool = self.POOL
        self.head = make_head(cfg.d_model, cfg.num_classes)
        # The default grid's scaffold lives in non-persistent buffers (they follow .to(device)
        # and stay out of the state dict, so the same weights load at any resolution).
        grid = cfg.img_size // cfg.patch_size
        self._default_grid = (grid, grid)
        sc = self.scaffold_for(self._default_grid)
        self._default_stencil = sc.stencil  # plain Python, not a buffer
        self.register_buffer("neighbors", sc.neighbors, persistent=False)
        self.register_buffer("edge_mask", sc.mask, persistent=False)
        self.register_buffer("edge_length", sc.length, persistent=False)
        self.register_buffer("edge_slots", sc.slots, persistent=False)
        self.register_buffer("centres", grid_centres(grid, grid), persistent=False)  # the patch centres
        self._other_grids: dict = {}

    @staticmethod
    def upgrade_config(config: dict, version: int) -> dict:
        """A config saved by checkpoint format ``version``, as today's Config reads it.

        Before format 2, "delaunay" was Qhull's triangulation (mixed diagonals); it is
        now the 6-offset one, so an older checkpoint keeps its own as "delaunay_qhull".
        """
        if version < 2 and config.get("scaffold", "delaunay") == "delaunay":
            config = {**config, "scaffold": "delaunay_qhull"}
        return config

    # -- scaffold and backend ------------------------------------------------------------
    def scaffold_for(self, grid: tuple[int, int]) -> scaffolds.Scaffold:
        """The scaffold of a token grid (height, width), on the CPU (built once, cached)."""
        return scaffolds.build(self.cfg.scaffold, *grid, radius=self.cfg.window_radius)

    def _scaffold(self, grid: tuple[int, int], device: torch.device) -> scaffolds.Scaffold:
        if grid == self._default_grid:
            return scaffolds.Scaffold(
                self.neighbors,
                self.edge_mask,
                self.edge_length,
                self.edge_slots,
                self._default_stencil,
            )
        key = (grid, str(device))
        if key not in self._other_grids:
            self._other_grids[key] = self.scaffold_for(grid).to(device)
        return self._other_grids[key]

    # -- forward -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, return_aux: bool = False):
        """States the readout pools, (B, N, D); with ``return_aux`` also the aux dict."""
        check_image_batch(x, self.cfg.in_chans, self.cfg.patch_size)
        tokens, grid = self.patch_embed(x)
        sc = self._scaffold(grid, x.device)
        backend = select_edge_backend(self.cfg.backend, x.device, sc)
        centres = self.centres if grid == self._default_grid else grid_centres(*grid, device=x.device)
        centres = centres.to(tokens.dtype)

        levels, gate_means = run_levels(self, tokens + self.pos_embed(centres), sc, backend)
        out = levels[0] if self.cfg.use_top_down else levels[-1]
        if not return_aux:
            return out
        # The mean gate over every real edge of the batch, averaged over layers.
        sparsity_loss = self.cfg.lambda_sparse * mean_gate(gate_means, x.shape[0] * max(sc.num_edges, 1))
        aux = {
            "losses": {
                "sparsity": sparsity_loss
            },  # afmp.training.losses: what training adds to the task loss
            "sparsity_loss": sparsity_loss,  # the same term under the notebook's name
            "gates": gate_means,
            "states": levels,
            "grid": grid,
        }
        return out, aux

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature API: each level's states (after the top-down pass) as (B, D, gh, gw)
        maps, or (B, N, D) with ``output_fmt="NLC"``. ``indices``: the levels (0 = the first
        layer's), or an int n for the last n; default all. Returns (features the head pools,
        maps), or the maps alone with ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        levels = self.cfg.num_layers
        if indices is None:
            indices = list(range(levels))
        elif isinstance(indices, int):
            indices = list(range(levels - indices, levels))
        if not all(isinstance(i, int) and -levels <= i < levels for i in indices):
            raise ValueError(f"indices must be levels in [0, {levels}), got {indices!r}")
        features, aux = self.forward_features(x, return_aux=True)
        (gh, gw), states = aux["grid"], aux["states"]
        maps = [states[i] for i in indices]
        if output_fmt == "NCHW":
            maps = [m.transpose(1, 2).unflatten(-1, (gh, gw)) for m in maps]
        return maps if intermediates_only else (features, maps)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.norm(features.mean(1) if self.global_pool else features)
        return pooled if pre_logits else self.head(pooled)


register_model(
    "afmp_tiny",
    AFMP,
    data="cifar100",
    img_size=32,
    patch_size=8,
    num_layers=4,
    d_model=128,
    sparsity=0.3,
    lambda_sparse=1e-4,
    num_classes=100,
)
register_model(
    "afmp_small",
    AFMP,
    data="imagenet",  # ImageNet-sized input (224²), the scaling study's
    img_size=224,
    patch_size=16,
    num_layers=5,
    d_model=512,
    sparsity=0.3,
    lambda_sparse=1e-4,
    num_classes=100,
)
register_model(
    "afmp_tiny_dense",
    AFMP,
    data="cifar100",
    img_size=32,
    patch_size=8,
    num_layers=4,
    d_model=128,
    sparsity=0.0,
    lambda_sparse=0.0,
    num_classes=100,
)
