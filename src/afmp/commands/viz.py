"""What the router learned: the communication graph over an image, sparsity per layer, gate values.

    afmp viz --checkpoint runs/afmp_tiny-digits --dataset digits --num 4
    afmp viz --checkpoint runs/afmp_tiny-cifar100 --images cat.png ship.jpg

``afmp train --viz-every K`` passes ``every(K)`` to the trainer, which then calls
``epoch_hook`` every K epochs and after the last, writing the same figures into the run
directory's ``viz/``. Gates come from
``model(x, return_aux=True)``: ``aux["gates"]`` holds one (B, N, K) tensor per layer, the
mean over channels of the gate on edge i <- j (exactly 0 where the edge was pruned), laid
out like the scaffold's neighbour lists (``model.scaffold_for(grid)``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from afmp.training.checkpoint import load_checkpoint  # noqa: E402
from afmp.utils.errors import usage_errors  # noqa: E402
from afmp.utils.files import save_png, write_json  # noqa: E402


# -- gates ----------------------------------------------------------------------------------
@torch.no_grad()
def collect_gates(model, images: torch.Tensor):
    """Per-layer gates (B, N, K) as float64 numpy, with the scaffold's (N, K) lists and the grid."""
    was_training = model.training
    model.eval()
    try:
        _, aux = model(images, return_aux=True)
    finally:
        model.train(was_training)
    if "gates" not in aux:
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)} has no gates to draw")
    grid = tuple(aux["grid"])
    sc = model.scaffold_for(grid)  # the input's own grid, at any resolution
    nbr, mask = sc.neighbors, sc.mask
    gates = [g.double().cpu().numpy() for g in aux["gates"]]
    return gates, nbr.cpu().numpy(), mask.cpu().numpy(), grid


def layer_sparsity(gates: list[np.ndarray], mask: np.ndarray) -> list[dict]:
    """Per layer, over the real edges of every image: fraction of gates exactly 0 (pruned) and below 0.5."""
    stats = []
    for g in gates:
        real = g[:, mask]  # (B, E)
        stats.append({"zero": float((real == 0).mean()), "below_half": float((real < 0.5).mean())})
    return stats


# -- figures --------------------------------------------------------------------------------
def show_image(ax, image: torch.Tensor, mean=None, std=None) -> None:
    """Undo the data set's normalisation and show a (C, H, W) image."""
    x = image.detach().double().cpu()
    if mean is not None and std is not None:
        x = (
            x * torch.tensor(std, dtype=x.dtype)[:, None, None]
            + torch.tensor(mean, dtype=x.dtype)[:, None, None]
        )
    else:  # unknown statistics: stretch to [0, 1]
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray" if x.shape[-1] == 1 else None, vmin=0, vmax=1)


def graph_edges(gates: np.ndarray, nbr: np.ndarray, mask: np.ndarray):
    """Undirected edges (i < j) of one image's (N, K) gates, each with the mean of i <- j and j <- i."""
    n = nbr.shape[0]
    rows = np.repeat(np.arange(n)[:, None], nbr.shape[1], 1)
    dense, adjacent = np.zeros((n, n)), np.zeros((n, n), bool)
    dense[rows[mask], nbr[mask]] = gates[mask]
    adjacent[rows[mask], nbr[mask]] = True
    i, j = np.nonzero(np.triu(adjacent, k=1))
    return i, j, (dense[i, j] + dense[j, i]) / 2


def draw_graph(ax, image, gates, nbr, mask, grid, *, mean=None, std=None) -> None:
    """Edges between patch centres over the image; width and opacity grow with the gate."""
    show_image(ax, image, mean, std)
    h, w = image.shape[-2:]
    gh, gw = grid
    token = np.arange(gh * gw)
    centres = np.stack([(token % gw + 0.5) * w / gw, (token // gw + 0.5) * h / gh], 1) - 0.5  # pixel centres
    i, j, g = graph_edges(gates, nbr, mask)
    colours = np.zeros((len(g), 4))
    colours[:, :3] = (0.0, 0.9, 1.0)  # cyan
    colours[:, 3] = 0.08 + 0.9 * g
    pruned = g == 0
    colours[pruned] = (0.6, 0.6, 0.6, 0.35)  # scaffold edges the router cut both ways: thin grey
    widths = np.where(pruned, 0.4, 0.5 + 3.5 * g)
    ax.add_collection(
        LineCollection(np.stack([centres[i], centres[j]], 1), colors=colours, linewidths=widths)
    )
    ax.scatter(centres[:, 0], centres[:, 1], s=8, c="white", edgecolors="black", linewidths=0.3)
    ax.axis("off")


def plot_graphs(image, gates: list[np.ndarray], nbr, mask, grid, path, *, title, mean=None, std=None) -> Path:
    """One panel per layer for one image; ``gates`` holds that image's (N, K) gates per layer."""
    fig, axes = plt.subplots(1, len(gates), figsize=(4 * len(gates), 4.3), squeeze=False)
    for layer, (ax, g) in enumerate(zip(axes[0], gates)):
        draw_graph(ax, image, g, nbr, mask, grid, mean=mean, std=std)
        ax.set_title(f"layer {layer}")
    fig.suptitle(title)
    return _save(fig, path)


def plot_sparsity(stats: list[dict], path, *, title) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(stats))
    ax.bar(x - 0.2, [100 * s["zero"] for s in stats], 0.4, label="gate exactly 0 (pruned)")
    ax.bar(x + 0.2, [100 * s["below_half"] for s in stats], 0.4, label="gate < 0.5")
    ax.set(xlabel="layer", ylabel="% of scaffold edges", ylim=(0, 100), xticks=x, title=title)
    ax.grid(axis="y", linestyle="--", alpha=0.6)
    ax.legend()
    return _save(fig, path)


def plot_histogram(gates: list[np.ndarray], mask: np.ndarray, path, *, title) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 51)
    for layer, g in enumerate(gates):
        ax.hist(g[:, mask].ravel(), bins=bins, histtype="step", linewidth=1.5, label=f"layer {layer}")
    ax.set(xlabel="gate (mean over channels)", ylabel="edges", yscale="log", title=title)
    ax.legend()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    save_png(fig, path, bbox_inches="tight")
    plt.close(fig)
    return path


# -- entry points ---------------------------------------------------------------------------
def render(
    model, images: torch.Tensor, out_dir, tag: str, *, mean=None, std=None, graphs: int = 1
) -> list[Path]:
    """All figures for ``images`` (stats over the batch; graphs for the first ``graphs`` images)."""
    out_dir = Path(out_dir)
    gates, nbr, mask, grid = collect_gates(model, images)
    stats = layer_sparsity(gates, mask)
    written = []
    for b in range(min(graphs, images.shape[0])):
        path = out_dir / f"graph_{tag}_img{b}.png"
        title = f"Communication graph ({tag}): edge width and opacity = gate"
        written.append(
            plot_graphs(
                images[b], [g[b] for g in gates], nbr, mask, grid, path, title=title, mean=mean, std=std
            )
        )
    written.append(plot_sparsity(stats, out_dir / f"sparsity_{tag}.png", title=f"Sparsity per layer ({tag})"))
    written.append(plot_histogram(gates, mask, out_dir / f"gates_{tag}.png", title=f"Gate values ({tag})"))
    write_json(out_dir / f"sparsity_{tag}.json", {"images": int(images.shape[0]), "layers": stats})
    return written


def epoch_hook(model, data, out, epoch: int, num_images: int = 16) -> list[Path]:
    """Called by the trainer: the same validation images every time, so epochs compare."""
    if not hasattr(model, "scaffold_for"):  # not a gated model: nothing to draw, but keep training
        print(f"viz: {getattr(model, 'model_name', type(model).__name__)} has no gates to draw; skipped")
        return []
    split = data.val if len(data.val) else data.test
    batch = torch.stack([split[i][0] for i in range(min(num_images, len(split)))])
    device = next(model.parameters()).device
    return render(
        model, batch.to(device), Path(out) / "viz", f"epoch{epoch:03d}", mean=data.mean, std=data.std
    )


def every(k: int):
    """The trainer's epoch hook (afmp.training.run.EpochHook) that draws every ``k`` epochs and after the last."""

    def draw(run, epoch: int) -> None:
        if epoch % k == 0 or epoch == run.cfg.epochs:
            epoch_hook(run.final, run.data, run.out, epoch)

    return draw


# -- afmp viz -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory written by afmp train")
    p.add_argument(
        "--stem", default="model", help="which weights: model (those the run tested, see --select) or last"
    )
    p.add_argument("--images", nargs="+", metavar="FILE", help="image files to draw over")
    p.add_argument("--dataset", help="draw over the first --num test images of this data set instead")
    p.add_argument("--data-dir", help="where the data set's files are")
    p.add_argument("--num", type=int, default=4, help="how many data set images (default 4)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel normalisation mean for --images")
    p.add_argument("--std", type=float, nargs="+", help="per-channel normalisation std for --images")
    p.add_argument("--out", help="output folder (default CHECKPOINT/viz)")
    p.add_argument("--device", default="cpu")


def _training_stats(run_dir: Path, data_dir):
    """The normalisation the checkpoint was trained with: its data set's statistics."""
    import yaml

    from afmp.data import DataUnavailable, build_dataset
    from afmp.data.vision import STATS

    config = run_dir / "config.yaml"
    name = yaml.safe_load(config.read_text()).get("dataset") if config.is_file() else None
    if name in STATS:
        return STATS[name]
    try:
        bundle = build_dataset(name, data_dir=data_dir) if name else None
    except (DataUnavailable, ValueError):
        bundle = None
    if bundle is None or bundle.mean is None:
        raise ValueError(f"cannot tell how {run_dir} normalised its inputs; pass --mean and --std")
    return bundle.mean, bundle.std


def load_images(paths, *, in_chans: int, size: int, mean, std) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import normalize, to_tensor

    batch = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("L" if in_chans == 1 else "RGB").resize((size, size), Image.BILINEAR)
            batch.append(normalize(to_tensor(im), list(mean), list(std)))
    return torch.stack(batch)


def main(args: argparse.Namespace) -> int:
    with usage_errors():  # reading the run and the images; drawing is not input
        run_dir = Path(args.checkpoint)
        if bool(args.images) == bool(args.dataset):
            raise ValueError("give either --images FILE ... or --dataset NAME (with --num N)")
        model = load_checkpoint(run_dir, args.stem, device=args.device)
        if not hasattr(model, "scaffold_for"):
            raise ValueError(f"{run_dir} holds a {model.model_name} model; afmp viz draws AFMP's gates only")
        if args.dataset:
            from afmp.data import build_dataset

            data = build_dataset(args.dataset, data_dir=args.data_dir)
            if args.num < 1:
                raise ValueError(f"--num must be at least 1, got {args.num}")
            images = torch.stack([data.test[i][0] for i in range(min(args.num, len(data.test)))])
            mean, std = data.mean, data.std
        else:
            mean, std = (
                (args.mean, args.std) if args.mean and args.std else _training_stats(run_dir, args.data_dir)
            )
            images = load_images(
                args.images, in_chans=model.cfg.in_chans, size=model.cfg.img_size, mean=mean, std=std
            )
    out = Path(args.out) if args.out else run_dir / "viz"
    written = render(model, images.to(args.device), out, args.stem, mean=mean, std=std, graphs=len(images))
    print(f"wrote {len(written)} figures to {out}")
    return 0
