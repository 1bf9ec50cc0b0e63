"""`afmp eval`: one checkpoint, per class.

``afmp eval --checkpoint DIR [--dataset NAME] [--split test]`` rebuilds the model and
the data set the run used (from DIR/config.yaml, unless told otherwise) and writes,
into DIR:

    confusion_<split>.png     the confusion matrix (rows: true class, columns: predicted)
    per_class_<split>.csv     support, correct and accuracy of each class
    per_class_<split>.json    the same, the overall accuracy and the confusion matrix

(`afmp compare`, one table over several runs, is afmp.commands.compare.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from afmp.data import build_dataset
from afmp.training.checkpoint import load_checkpoint
from afmp.training.config import run_settings
from afmp.utils.errors import usage_errors
from afmp.utils.files import save_png, write_csv, write_json
from afmp.utils.runtime import autocast, resolve_device, to_device


# -- afmp eval ------------------------------------------------------------------------------
@torch.no_grad()
def confusion_matrix(model, loader, num_classes: int, device, amp: bool = True) -> torch.Tensor:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long)
    for inputs, labels in loader:
        with autocast(device, amp):
            logits = model(to_device(inputs, device))
        pred = logits.argmax(-1).cpu()
        counts += torch.bincount(labels.cpu() * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def per_class_table(confusion: torch.Tensor, class_names: list[str]) -> list[dict]:
    support, correct = confusion.sum(1), confusion.diag()
    return [
        {
            "class": i,
            "name": class_names[i],
            "support": int(support[i]),
            "correct": int(correct[i]),
            "accuracy": 100.0 * int(correct[i]) / int(support[i]) if support[i] else None,
        }
        for i in range(len(class_names))
    ]


def plot_confusion(confusion: torch.Tensor, class_names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    # Row-normalised, so rare and common classes read on one colour scale.
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(min(4 + 0.4 * n, 14), min(3.5 + 0.4 * n, 13)))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 20:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def evaluate_checkpoint(
    directory: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
) -> dict:
    """Evaluate DIR's best weights on one split; writes the PNG, CSV and JSON; returns the JSON's dict."""
    with usage_errors():  # the run, its settings and the data: input, checked before any work
        directory = Path(directory)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        dev = resolve_device(device)
        model = load_checkpoint(directory, device=dev)
        settings = run_settings(directory)
        same_data = dataset is None or dataset == settings.get("dataset")
        name = dataset or settings.get("dataset")
        if not name:
            raise ValueError(f"{directory} has no config.yaml naming its data set: pass --dataset")
        # The run's own split seed and options, so that "test" is the test split it never trained on.
        options = {
            "data_dir": data_dir or (settings.get("data_dir") if same_data else None),
            "val_fraction": settings.get("val_fraction", 0.1),
            "seed": settings.get("seed", 0),
            **((settings.get("data_opts") or {}) if same_data else {}),
        }
        data = build_dataset(name, **options)
        num_classes = data.model_args.get("num_classes")
        if num_classes != model.num_classes:
            raise ValueError(f"data set {name!r} has {num_classes} classes, the model {model.num_classes}")
        class_names = data.class_names or [str(i) for i in range(num_classes)]
        loader = torch.utils.data.DataLoader(
            getattr(data, split), batch_size=batch_size, collate_fn=data.collate_fn
        )
    confusion = confusion_matrix(model, loader, num_classes, dev, amp=settings.get("amp", True))
    total = int(confusion.sum())
    accuracy = 100.0 * int(confusion.diag().sum()) / max(total, 1)
    rows = per_class_table(confusion, class_names)
    report = {
        "checkpoint": str(directory),
        "model": model.model_name,
        "dataset": name,
        "split": split,
        "samples": total,
        "accuracy": accuracy,
        "per_class": rows,
        "confusion": confusion.tolist(),
    }
    write_json(directory / f"per_class_{split}.json", report)
    write_csv(directory / f"per_class_{split}.csv", rows)
    title = f"{model.model_name} on {name} ({split}): {accuracy:.2f}% of {total}"
    plot_confusion(confusion, class_names, title, directory / f"confusion_{split}.png")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory written by afmp train")
    p.add_argument("--dataset", help="data set name (default: the run's)")
    p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(
        f"{report['model']} on {report['dataset']} {report['split']}: {report['accuracy']:.2f}% of {report['samples']}"
    )
    scored = [r for r in report["per_class"] if r["accuracy"] is not None]
    for r in sorted(scored, key=lambda r: r["accuracy"])[:5]:
        print(f"  lowest: class {r['name']}: {r['accuracy']:.1f}% of {r['support']}")
    print(f"wrote confusion_{args.split}.png, per_class_{args.split}.csv/.json in {args.checkpoint}")
    return 0
