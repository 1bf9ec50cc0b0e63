"""The report of `afmp reproduce`: ``report.md`` with the claim, our numbers with their
spread, and whether the spread allows a conclusion (afmp.studies.reproduce runs the studies)."""

from __future__ import annotations

import math
from pathlib import Path

from afmp.utils.files import atomic_write


def verdict_paired(rows: list[dict]) -> list[str]:
    reference = rows[0]
    lines = []
    for r in rows[1:]:
        if r["test_pairs"] < 2:
            lines.append(f"- {r['label']}: one seed, no spread: no conclusion can be drawn.")
            continue
        if math.isnan(r["test_p_value"]):
            lines.append(
                f"- {r['label']} − {reference['label']} = {r['test_diff_mean']:+.2f} points on each of "
                f"{r['test_pairs']} seeds: no spread to test against."
            )
        elif r["test_p_value"] < 0.05:
            side = "above" if r["test_diff_mean"] > 0 else "below"
            lines.append(
                f"- {r['label']} is {side} {reference['label']} by {abs(r['test_diff_mean']):.2f} points "
                f"(paired over {r['test_pairs']} seeds, p = {r['test_p_value']:.3f} < 0.05): distinguishable."
            )
        else:
            lines.append(
                f"- {r['label']} − {reference['label']} = {r['test_diff_mean']:+.2f} ± {r['test_diff_std']:.2f} "
                f"points over {r['test_pairs']} seeds (p = {r['test_p_value']:.3f}): within seed noise."
            )
    return lines


def write_report(out: Path, name: str, study: dict, body: list[str]) -> Path:
    text = "\n".join(
        [
            f"# {name}",
            "",
            f"**Claim tested:** {study['claim']}",
            "",
            f"Config: `afmp reproduce {name}` (`src/afmp/configs/studies/{name}.yaml`), "
            f"{study.get('seeds', 1)} seed(s); the full settings are in `study.json`.",
            "",
            *recipe_lines(study.get("recipe")),
            *body,
            "",
        ]
    )
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return out / "report.md"


def recipe_lines(recipe: dict | None) -> list[str]:
    """Where the study's training settings came from, when not from its config (--recipe)."""
    if not recipe:
        return []
    return [
        f"Recipe: afmp tune's best trial ({recipe['trial']}, validation {recipe['val_accuracy']:.2f}%) "
        f"in `{recipe['from']}`; its settings replace the config's where they name the same one.",
        "",
    ]


def ablation_lines(rows: list[dict]) -> list[str]:
    """An ablation study's table (ablate.summarize's rows) and its verdict."""
    from afmp.studies import ablate

    best = max(rows, key=lambda r: r["test_mean"])
    return [
        "## Test accuracy (%), mean ± std over seeds; paired differences against the first setting",
        "",
        *ablate.table_lines(rows),
        "",
        f"Highest mean test accuracy: {best['label']} ({best['test_mean']:.2f}%).",
        "",
        "## Does the spread allow a conclusion?",
        "",
        *verdict_paired(rows),
        "",
        "Figure: `comparison.png` (validation accuracy, training loss, sparsity loss, epoch time).",
    ]


VERDICTS = ("frontiers", "paired")  # what a pareto study's claim is read from (its ``verdict:``)


AXES = {"matmul_gflops": "FLOPs", "ms_b1": "latency at batch 1", "ms_b64": "latency at batch 64"}


def frontiers(rows: list[dict]) -> dict[str, list[str]]:
    """Each cost axis's Pareto frontier (``AXES``' names) through the rows' mean accuracies."""
    from afmp.bench import plots

    return {
        axis: [rows[i]["run"] for i in plots.pareto_front([(r[key], r["accuracy"]) for r in rows])]
        for key, axis in AXES.items()
    }


def afmp_on(front: list[str]) -> list[str]:
    return [run for run in front if run.startswith("afmp")]


def frontier_verdict(fronts: dict[str, list[str]]) -> str:
    """The pareto claim's verdict: AFMP on the FLOPs frontier and on no latency frontier."""
    flops = bool(afmp_on(fronts["FLOPs"]))
    latency = any(afmp_on(front) for axis, front in fronts.items() if axis != "FLOPs")
    return {
        (True, False): "consistent with the claim: AFMP is on the FLOPs frontier and on no latency frontier.",
        (True, True): "not supported here: AFMP is on the FLOPs frontier and on a latency frontier too.",
        (False, True): "not supported here: AFMP is on a latency frontier but not on the FLOPs one.",
        (False, False): "not supported here: AFMP is on no frontier.",
    }[flops, latency]


def read_pareto_rows(path: Path) -> list[dict]:
    """A pareto study's ``pareto.csv``, with the numbers the report reads as numbers."""
    import csv

    numeric = ("accuracy", "accuracy_std", "seeds", "params", "matmul_gflops", "ms_b1", "ms_b64")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {**r, **{k: float(r[k]) if r.get(k) not in (None, "") else math.nan for k in numeric}} for r in rows
    ]


def recipes_lines(shared: list[dict], tuned: list[dict]) -> list[str]:
    """Each model under the study's one shared recipe and under its own tuned recipe, side by
    side: mean test accuracy, and which frontiers it is on; then the verdict under each."""
    fronts = {"shared": frontiers(shared), "tuned": frontiers(tuned)}

    def on(which: str, run: str) -> str:
        """The frontiers through ``run``, as "FLOPs, batch 1", or a dash."""
        names = [axis.removeprefix("latency at ") for axis, front in fronts[which].items() if run in front]
        return ", ".join(names) or "—"

    def accuracy(r: dict) -> str:
        return f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f}"

    by_run = {r["run"]: r for r in shared}
    lines = [
        "## The shared recipe against each model's tuned recipe",
        "",
        "| model | test %, shared recipe | test %, tuned | tuned − shared | frontiers, shared | frontiers, tuned |",
        "|---|---|---|---|---|---|",
    ]
    for r in tuned:
        s = by_run.get(r["run"])  # None: a model the shared study did not train
        was, gain = ("—", "—") if s is None else (accuracy(s), f"{r['accuracy'] - s['accuracy']:+.2f}")
        lines.append(
            f"| {r['run']} | {was} | {accuracy(r)} | {gain} | {on('shared', r['run'])} | {on('tuned', r['run'])} |"
        )
    return [
        *lines,
        "",
        f"Verdict under the shared recipe: {frontier_verdict(fronts['shared'])}",
        f"Verdict under the tuned recipes: {frontier_verdict(fronts['tuned'])}",
        "",
    ]


def pareto_lines(
    name: str, rows: list[dict], labels: list[str], device: str, repeats: int, verdict_from: str = "frontiers"
) -> list[str]:
    """The accuracy and cost table, the frontiers against FLOPs and latency, the verdict on the
    claim: the pareto claim's, from the frontiers; with ``verdict_from="paired"`` the claim is
    a paired comparison, which the report's last section gives."""

    lines = [
        f"## Accuracy and cost (latency: inference on {device}, median of {repeats})",
        "",
        f"| model | params | test % (mean ± std, seeds) | test − {labels[0]} (paired) | ahead | p "
        "| matmul GFLOP / input | ms, batch 1 | ms, batch 64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = "— | — | —"
        if r is not rows[0]:
            vs = f"{r['test_diff_mean']:+.2f} ± {r['test_diff_std']:.2f} | {r['test_ahead']}/{r['test_pairs']} | {r['test_p_value']:.3f}"
        lines.append(
            f"| {r['run']} | {r['params'] / 1e6:.3f}M | {r['accuracy']:.2f} ± {r['accuracy_std']:.2f} ({r['seeds']}) "
            f"| {vs} | {r['matmul_gflops']:.4f} | {r['ms_b1']:.2f} | {r['ms_b64']:.2f} |"
        )
    lines += ["", "## Frontiers", ""]
    fronts = frontiers(rows)
    for axis, front in fronts.items():
        on = afmp_on(front)
        lines.append(
            f"- Against {axis}: frontier {', '.join(front)}; AFMP "
            + (f"on it ({', '.join(on)})." if on else "not on it.")
        )
    verdict = frontier_verdict(fronts)
    if verdict_from == "paired":
        verdict = f"the claim is a paired comparison: see the differences against {labels[0]} below."
    lines += [
        "",
        f"Verdict: {verdict} The frontiers go through mean accuracies; differences smaller than "
        "the stds above are within seed noise.",
        "",
        f"## Test accuracy against {labels[0]}, seed by seed",
        "",
        *verdict_paired(rows),
        "",
        "Figure: `pareto.png`.",
    ]
    return lines


def scaling_lines(rows: list[dict], what: str) -> list[str]:
    """Growth of time and memory with the number of tokens: fitted exponents and memory walls."""
    from afmp.bench import plots

    lines = [
        f"## Growth with the number of tokens N ({what})",
        "",
        "Fitted over each model's three largest sizes that ran: time ∝ N^a, memory ∝ N^b.",
        "",
        "| model | sizes run | out of memory at | a (time) | b (memory) |",
        "|---|---|---|---|---|",
    ]
    for model, mrows in plots.by_model(rows).items():
        ok = [r for r in mrows if not r["oom"] and math.isfinite(r["ms_median"])]
        oom = [str(r["resolution"]) for r in mrows if r["oom"]]
        top = ok[-3:]
        a = (
            plots.scaling_exponent([r["tokens"] for r in top], [r["ms_median"] for r in top])
            if len(top) > 1
            else math.nan
        )
        b = (
            plots.scaling_exponent([r["tokens"] for r in top], [r["peak_mb"] for r in top])
            if len(top) > 1
            else math.nan
        )
        lines.append(f"| {model} | {len(ok)} | {', '.join(oom) or '—'} | {a:.2f} | {b:.2f} |")
    lines += [
        "",
        "Linear scaling means an exponent near 1; the memory wall is where a model runs out of memory.",
        "",
        "Figures: `time_vs_tokens.png`, `memory_vs_tokens.png`.",
    ]
    return lines
