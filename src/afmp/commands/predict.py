"""`afmp predict`: the classes of image files, by a trained run.

``afmp predict --checkpoint RUN FILES_OR_DIRS... [--top-k 5] [--out preds.csv|.json]``
reads each file as the run's evaluation did (afmp.deploy.predict) and prints the top
classes per file, or writes them to --out (CSV or JSON, by its suffix).
"""

from __future__ import annotations

import argparse

from afmp.deploy.predict import Predictor, check_output, find_images, predict_files, write_predictions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory written by afmp train")
    p.add_argument(
        "paths", nargs="+", metavar="FILES_OR_DIRS", help="image files, or folders searched for them"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per file, most probable first (default 5)")
    p.add_argument("--out", help="write the predictions to this .csv or .json file instead of printing them")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> int:
    check_output(args.out)
    files = find_images(args.paths)
    predictor = Predictor.from_run(args.checkpoint, args.device)
    rows = predict_files(predictor, files, top_k=args.top_k, batch_size=args.batch_size)
    if args.out:
        write_predictions(args.out, rows, predictor)
        print(f"wrote the top {len(rows[0]['top'])} classes of {len(rows)} files to {args.out}")
    else:
        for row in rows:
            top = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"])
            print(f"{row['file']}: {top}")
    return 0
