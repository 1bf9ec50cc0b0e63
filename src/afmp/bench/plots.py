"""PNGs beside the numbers: scaling on log-log axes with fitted exponents, latency vs FLOPs, Pareto."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from afmp.utils.files import save_png  # noqa: E402


def _finite(rows, *keys):
    return [
        r
        for r in rows
        if all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0 for k in keys)
    ]


def by_model(rows) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    return groups


FIT_POINTS = 3  # sizes the scaling exponent is fitted on (the largest measured)


def scaling_exponent(xs, ys) -> float:
    """Slope of log y against log x (least squares); NaN with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_against_tokens(rows, key: str, ylabel: str, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model, group in by_model(rows).items():
        pts = sorted(_finite(group, "tokens", key), key=lambda r: r["tokens"])
        if not pts:
            continue
        xs, ys = [r["tokens"] for r in pts], [r[key] for r in pts]
        # Fit the largest sizes only: at small N a GPU step is launch-bound and flat, which
        # would drag every exponent towards 0 and hide the regime the comparison is about.
        fit = slice(-FIT_POINTS, None)
        k = scaling_exponent(xs[fit], ys[fit])
        label = (
            f"{model} (∝ N^{k:.2f} over the {min(FIT_POINTS, len(xs))} largest)"
            if math.isfinite(k)
            else model
        )
        (line,) = ax.plot(xs, ys, "o-", label=label)
        for r in group:  # out of memory: an x at the top of the axes
            if r["oom"] and isinstance(r["tokens"], (int, float)) and math.isfinite(r["tokens"]):
                ax.plot([r["tokens"]], [max(ys)], "x", color=line.get_color(), markersize=9)
    ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_latency_vs_flops(rows, path: Path, calib: dict) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts_all = _finite(rows, "total_gflops", "ms_median")
    for model, group in by_model(pts_all).items():
        pts = sorted(group, key=lambda r: r["total_gflops"])
        ax.plot([r["total_gflops"] for r in pts], [r["ms_median"] for r in pts], "o-", label=model)
    if pts_all:
        # The compute roof: every flop at the calibrated dense-matmul rate.
        g = np.geomspace(min(r["total_gflops"] for r in pts_all), max(r["total_gflops"] for r in pts_all), 20)
        ax.plot(
            g, g * 1e9 / calib["peak_flops_per_s"] * 1e3, "k--", lw=1, label="all flops at peak matmul rate"
        )
    ax.set(xscale="log", yscale="log", xlabel="GFLOP per step (total)", ylabel="step time (ms)")
    ax.set_title("Latency against FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower cost and higher accuracy), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(rows, path: Path, panels: list[tuple[str, str]], title: str = "") -> Path:
    """Accuracy against each cost in ``panels`` ((column, axis label)); the frontier marked;
    error bars where the rows carry ``accuracy_std`` (accuracy over seeds)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = _finite(rows, key)
        xy = [(r[key], r["accuracy"]) for r in pts]
        for r, (x, y) in zip(pts, xy):
            std = r.get("accuracy_std", math.nan)
            ax.errorbar(x, y, yerr=std if math.isfinite(std) else None, fmt="o", capsize=3)
            ax.annotate(r["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = [xy[i] for i in pareto_front(xy)]
        if front:
            ax.plot(*zip(*front), "k--", lw=1, label="Pareto frontier")
            ax.legend(fontsize=7)
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or "test accuracy against cost")
    return _save(fig, path)
