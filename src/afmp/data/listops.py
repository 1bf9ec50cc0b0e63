"""ListOps as the Long Range Arena defines it: generator, evaluator, TSV files, reader.

A ListOps example is a nested expression over the digits 0-9 and the operators
MIN, MAX, MED (median) and SM (sum modulo 10); the label is its value, so ten
classes. This module follows LRA's generator (``lra_benchmarks/data/listops.py``):

- a node at depth < ``max_depth`` is an operator with probability 0.25 (else a
  digit), with 2..``max_args`` arguments; at ``max_depth`` it is always a digit;
- an expression's *length* counts digits, operators and closing brackets (2 per
  operator), not parentheses; LRA keeps lengths strictly between ``min_length``
  and ``max_length`` (500 and 2,000 by default);
- MED is ``int(numpy.median(args))``: for an even count, the mean of the two
  middle values, truncated;
- examples are unique across the three splits; the files are ``basic_train.tsv``,
  ``basic_val.tsv`` and ``basic_test.tsv``, tab-separated with the header
  ``Source<TAB>Target``, written by Python's csv module (lines end in CRLF);
- the Source string is LRA's rendering, with parentheses:
  ``[MAX 2 9]`` is written ``( ( ( [MAX 2 ) 9 ) ] )``.

Two things differ from LRA's script, on purpose: the generator takes a seed and
keeps generation order (LRA iterates a Python set, whose order changes from run to
run), and the reader uses one fixed vocabulary for every split (the seed code built
one per split, so a token's id could differ between train and test).
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter
from pathlib import Path

import torch

from afmp.data.base import DataBundle, DataUnavailable, register_dataset
from afmp.data.text import TextDataset, pad_collate
from afmp.utils.errors import UsageError
from afmp.utils.files import atomic_write, write_json

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
# LRA's generator also defines FIRST and LAST, unused by its "basic" task; the reader
# and the evaluator accept them so that the user's own variants still load.
EXTRA_OPERATORS = ("[FIRST", "[LAST")
END = "]"
PARENS = ("(", ")")
DIGITS = tuple(str(d) for d in range(10))
# One vocabulary for every split and every file: id 0 is padding.
VOCAB = ("<pad>", *PARENS, END, *OPERATORS, *EXTRA_OPERATORS, *DIGITS)
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
SPLITS = ("train", "val", "test")
VALUE_P = 0.25  # probability that a node above max_depth is an operator (LRA's VALUE_P)


# -- values -------------------------------------------------------------------------------
def apply_operator(op: str, args: list[int]) -> int:
    if not args:
        raise ValueError(f"operator {op} has no arguments")
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s, m = sorted(args), len(args) // 2
        # int(np.median): the middle value, or the mean of the two middle ones truncated
        # (values are non-negative, so floor division truncates).
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
    if op == "[SM":
        return sum(args) % 10
    if op == "[FIRST":
        return args[0]
    if op == "[LAST":
        return args[-1]
    raise ValueError(
        f"unknown ListOps operator {op!r}; expected one of {', '.join(OPERATORS + EXTRA_OPERATORS)}"
    )


def expression_value(source: str) -> int:
    """Value of a ListOps expression, with or without LRA's parentheses."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    for tok in source.split():
        if tok in PARENS:
            continue
        if tok in OPERATORS or tok in EXTRA_OPERATORS:
            if result is not None:
                raise ValueError(f"expected one expression, found more in {source[:80]!r}")
            stack.append((tok, []))
            continue
        if tok == END:
            if not stack:
                raise ValueError(f"unbalanced ']' in {source[:80]!r}")
            op, args = stack.pop()
            value = apply_operator(op, args)
        elif tok in DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"unknown token {tok!r} in ListOps expression {source[:80]!r}")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"expected one expression, found more in {source[:80]!r}")
    if stack or result is None:
        raise ValueError(f"incomplete ListOps expression {source[:80]!r}")
    return result


# -- generation ---------------------------------------------------------------------------
# A tree is a digit (int) or (operator, tuple of trees): hashable, so duplicates are found.
class _TooLong(Exception):
    pass


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, limit: float = float("inf")):
    """(tree, length) as LRA's generate_tree draws them (same probabilities, same order of draws).

    A tree that reaches ``limit`` tokens is abandoned (``_TooLong``): the window rejects it
    anyway, and the draws are independent, so the accepted trees keep LRA's distribution;
    without the cut, the rare huge trees take most of the generation time.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(range(10)), 1
    length, args = 2, []
    for _ in range(rng.randint(2, max_args)):
        sub, sub_length = generate_tree(rng, depth + 1, max_depth, max_args, limit - length)
        args.append(sub)
        length += sub_length
        if length >= limit:
            raise _TooLong
    return (rng.choice(OPERATORS), tuple(args)), length


def tree_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    return apply_operator(op, [tree_value(a) for a in args])


def to_source(tree) -> str:
    """LRA's string: each argument closes one level of parentheses, then ``] )``."""
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    s = f"( {op} {to_source(args[0])} )"
    for arg in args[1:]:
        s = f"( {s} {to_source(arg)} )"
    return f"( {s} {END} )"


def generate(
    num: int,
    *,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
    max_tries: int | None = None,
) -> list[tuple[str, int]]:
    """``num`` distinct (source, value) pairs with min_length < length < max_length (LRA's test)."""
    if num < 0:
        raise UsageError(f"number of examples must be >= 0, got {num}")
    if min_length < 0 or max_length - min_length < 2:
        raise UsageError(
            f"lengths are kept strictly between min_length and max_length (as LRA does); "
            f"got {min_length} and {max_length}, which leave no length"
        )
    if max_depth < 2 or max_args < 2:
        raise UsageError(f"max_depth and max_args must be >= 2, got {max_depth} and {max_args}")
    rng = random.Random(seed)
    trees: dict = {}  # insertion-ordered set
    max_tries = max_tries if max_tries is not None else 2000 * num + 100_000
    for _ in range(max_tries):
        if len(trees) >= num:
            break
        try:
            tree, length = generate_tree(rng, 1, max_depth, max_args, max_length)
        except _TooLong:
            continue
        if min_length < length < max_length:
            trees[tree] = None
    if len(trees) < num:
        raise ValueError(
            f"found only {len(trees)} of {num} distinct expressions of length in ({min_length}, {max_length}) "
            f"with max_depth={max_depth}, max_args={max_args} after {max_tries} draws; widen the window"
        )
    return [(to_source(t), tree_value(t)) for t in trees]


def write_tsv(path: str | os.PathLike, rows: list[tuple[str, int]]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")  # the excel dialect: CRLF, as LRA's files
            writer.writerow(["Source", "Target"])
            writer.writerows(rows)

    return atomic_write(path, write)


def generate_files(
    out: str | os.PathLike,
    *,
    num_train: int = 96_000,
    num_val: int = 2_000,
    num_test: int = 2_000,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
) -> dict:
    """Write ``basic_{train,val,test}.tsv`` (and ``listops.json``, the settings) into ``out``."""
    rows = generate(
        num_train + num_val + num_test,
        min_length=min_length,
        max_length=max_length,
        max_depth=max_depth,
        max_args=max_args,
        seed=seed,
    )
    out = Path(out)
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val)}
    bounds["test"] = (num_train + num_val, len(rows))
    for split, (lo, hi) in bounds.items():
        write_tsv(out / f"basic_{split}.tsv", rows[lo:hi])
    settings = {
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "min_length": min_length,
        "max_length": max_length,
        "max_depth": max_depth,
        "max_args": max_args,
        "seed": seed,
        "length": "digits + operators + ']' (no parentheses), kept strictly inside (min_length, max_length)",
    }
    write_json(out / "listops.json", settings)
    return settings


# -- reading ------------------------------------------------------------------------------
def read_tsv(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(sources, targets) of an LRA ListOps TSV (header Source, Target; any column order)."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or "Source" not in header or "Target" not in header:
            raise ValueError(f"{path}: expected a header with columns Source and Target, got {header}")
        src, tgt = header.index("Source"), header.index("Target")
        sources, targets = [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                target = int(row[tgt])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line}: expected an integer Target, got {row}") from None
            if not 0 <= target <= 9:
                raise ValueError(f"{path}:{line}: Target must be a digit 0-9, got {target}")
            sources.append(row[src])
            targets.append(target)
    return sources, targets


def encode(source: str, *, keep_parens: bool = False) -> list[int]:
    """Token ids in the fixed VOCAB. Parentheses are dropped by default: LRA's tokenizer
    drops them too, and they carry nothing the brackets do not."""
    ids = []
    for tok in source.split():
        if tok in PARENS and not keep_parens:
            continue
        if tok not in TOKEN_ID or tok == VOCAB[0]:
            raise ValueError(f"unknown ListOps token {tok!r}; the vocabulary is {', '.join(VOCAB[1:])}")
        ids.append(TOKEN_ID[tok])
    return ids


# -- what a model must beat ----------------------------------------------------------------
def root_operator(source: str) -> str:
    """The outermost operator of an expression (its first operator token), e.g. ``[MAX``."""
    for tok in source.split():
        if tok in OPERATORS or tok in EXTRA_OPERATORS:
            return tok
    raise ValueError(f"no operator in ListOps expression {source[:80]!r}")


def baselines(train: tuple[list[str], list[int]], evaluated: tuple[list[str], list[int]]) -> dict:
    """Accuracy (%) on ``evaluated`` of two rules fitted on ``train`` (sources, targets):

    - ``majority``: the most frequent training label, for every example;
    - ``root_operator``: the most frequent training label among examples with the same
      outermost operator (MAX -> 9, MIN -> 0, ...): what a model that reads only the first
      token can reach. A model that beats it has learned something of the nesting.
    Ties go to the smaller label.
    """
    sources, targets = train
    if not sources:
        raise ValueError("the training split is empty: nothing to fit the baselines on")

    def most_common(labels) -> int:
        counts = Counter(labels)
        return min(counts, key=lambda y: (-counts[y], y))

    overall = most_common(targets)
    by_root: dict[str, list[int]] = {}
    for source, target in zip(sources, targets):
        by_root.setdefault(root_operator(source), []).append(target)
    rule = {op: most_common(labels) for op, labels in by_root.items()}
    eval_sources, eval_targets = evaluated
    n = max(len(eval_targets), 1)
    return {
        "majority": 100.0 * sum(t == overall for t in eval_targets) / n,
        "root_operator": 100.0
        * sum(rule.get(root_operator(s), overall) == t for s, t in zip(eval_sources, eval_targets))
        / n,
    }


# -- the registered data set -----------------------------------------------------------------
# Generated when no --data-dir is given: sized to train on a CPU in minutes.
CPU_DEFAULTS = {"num_train": 2000, "num_val": 500, "num_test": 1000, "min_length": 50, "max_length": 200}


from afmp.utils.environment import cache_dir  # noqa: E402  (where generated sets are kept)


@register_dataset("listops")
def listops(
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_fraction: float | None = None,
    seed: int = 0,
    max_len: int | None = None,
    keep_parens: bool = False,
    **generate_opts,
) -> DataBundle:
    """LRA ListOps from ``basic_{train,val,test}.tsv`` in ``data_dir``.

    With no ``data_dir``, a CPU-sized set (CPU_DEFAULTS: 2,000 / 500 / 1,000 examples of
    length 51-199, data seed 0; override with ``--data-opt num_train=...`` and the other
    generate_files options) is generated once into ``$AFMP_CACHE/listops/<settings>``
    (default ``~/.cache/afmp``). LRA ships its own validation split, so ``val_fraction``
    is not used. ``max_len`` truncates (default: the longest sequence of the three splits).
    """
    del download, val_fraction, seed  # the files define the splits; the run's seed does not
    if data_dir is None:
        valid = set(CPU_DEFAULTS) | {"max_depth", "max_args", "data_seed"}
        unknown = sorted(set(generate_opts) - valid)
        if unknown:
            raise ValueError(
                f"unknown listops option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        settings = {**CPU_DEFAULTS, **generate_opts}
        settings["seed"] = settings.pop("data_seed", 0)
        key = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:10]
        root = cache_dir() / "listops" / key
        if not all((root / f"basic_{s}.tsv").exists() for s in SPLITS):
            print(f"generating ListOps {settings} into {root}")
            generate_files(root, **settings)
    else:
        if generate_opts:
            raise ValueError(
                f"option(s) {', '.join(sorted(generate_opts))} only apply when ListOps is generated "
                f"(no --data-dir); valid with --data-dir: max_len, keep_parens"
            )
        root = Path(data_dir)
    missing = [f"basic_{s}.tsv" for s in SPLITS if not (root / f"basic_{s}.tsv").exists()]
    if missing:
        raise DataUnavailable(
            f"ListOps needs {', '.join(missing)} in {root} (LRA's files, or write them with "
            f"`afmp listops generate --out {root}`)"
        )
    splits = {}
    for s in SPLITS:
        sources, targets = read_tsv(root / f"basic_{s}.tsv")
        splits[s] = ([torch.tensor(encode(x, keep_parens=keep_parens)) for x in sources], targets)
    longest = max(len(ids) for seqs, _ in splits.values() for ids in seqs)
    max_len = max_len or longest
    datasets = {s: TextDataset(seqs, targets, max_len=max_len) for s, (seqs, targets) in splits.items()}
    return DataBundle(
        name="listops",
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        model_args={"vocab_size": len(VOCAB), "num_classes": 10, "max_len": max_len},
        class_names=list(DIGITS),
        collate_fn=pad_collate,
        info={"root": str(root), "vocab": list(VOCAB), "longest": longest},
    )
