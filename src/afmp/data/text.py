"""Text classification data: AG News and IMDB from files on disk, tokenizers, padding.

Token id 0 is padding everywhere; a batch is ``(tokens (B, L) long, labels (B,))``
padded on the right to its longest sequence (``pad_collate``), and models derive
their mask from ``tokens != 0``.

Tokenizers: ``byte`` (the default; UTF-8 bytes, id = byte + 1, 257 ids, nothing to
download or fit) and ``word`` (lower-cased words and punctuation, the vocabulary
counted on the training split only, after the validation split is held out;
0 padding, 1 unknown). Choose with ``--data-opt tokenizer=word``.

Files:
- AG News: ``train.csv`` and ``test.csv`` as distributed (no header; columns class,
  title, description; classes 1-4 = World, Sports, Business, Sci/Tech), in
  ``--data-dir`` or its ``ag_news_csv/`` folder. The text is title + " " + description.
- IMDB: the ``aclImdb/{train,test}/{pos,neg}/*.txt`` folders (``--data-dir`` may be
  ``aclImdb`` itself or its parent); neg = 0, pos = 1.
With ``--download`` and no files, the Hugging Face ``datasets`` package (if installed,
and online) loads ``ag_news`` / ``imdb`` instead.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from afmp.data.base import DataBundle, DataUnavailable, register_dataset

PAD_ID = 0
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
IMDB_CLASSES = ["neg", "pos"]


# -- tokenizers ---------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes shifted by one, so that 0 stays free for padding."""

    vocab_size = 257

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        if not data:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1


class WordTokenizer:
    """Words (lower-cased, apostrophes kept inside) and single punctuation marks."""

    PATTERN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]")
    UNK_ID = 1

    def __init__(self, words: Sequence[str]):
        self.itos = ["<pad>", "<unk>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls.PATTERN.findall(text.lower())

    @classmethod
    def fit(cls, texts: Sequence[str], *, max_size: int = 50_000, min_freq: int = 2) -> WordTokenizer:
        """Vocabulary of the ``max_size`` most frequent words seen ``min_freq`` times (ties alphabetical)."""
        if max_size < 1 or min_freq < 1:
            raise ValueError(f"max_vocab and min_freq must be >= 1, got {max_size} and {min_freq}")
        counts = Counter(w for t in texts for w in cls.split(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_size])

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(w, self.UNK_ID) for w in self.split(text)], dtype=torch.long)


# -- data sets and batches ------------------------------------------------------------------
class TextDataset(Dataset):
    """Items are texts encoded on access by ``encode``, or id sequences when ``encode`` is None;
    each is truncated to ``max_len`` tokens."""

    def __init__(
        self, items: Sequence, labels: Sequence[int], *, max_len: int, encode: Callable | None = None
    ):
        if len(items) != len(labels):
            raise ValueError(f"{len(items)} texts but {len(labels)} labels")
        self.items, self.labels = items, torch.as_tensor(labels, dtype=torch.long)
        self.encode, self.max_len = encode, max_len

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        ids = self.items[i] if self.encode is None else self.encode(self.items[i])
        return torch.as_tensor(ids, dtype=torch.long)[: self.max_len], self.labels[i]

    def lengths(self) -> list[int]:
        """Every item's length in tokens after truncation (what --group-by-length sorts by)."""
        ids = self.items if self.encode is None else map(self.encode, self.items)
        return [min(len(i), self.max_len) for i in ids]


def pad_collate(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with PAD_ID to the batch's longest sequence (at least one column)."""
    seqs, labels = zip(*batch)
    tokens = torch.full((len(seqs), max(1, *(len(s) for s in seqs))), PAD_ID, dtype=torch.long)
    for row, s in zip(tokens, seqs):
        row[: len(s)] = s
    return tokens, torch.stack([torch.as_tensor(y, dtype=torch.long) for y in labels])


# -- readers ------------------------------------------------------------------------------
def read_agnews_csv(path: str | Path) -> tuple[list[str], list[int]]:
    """(texts, labels 0-3) of an AG News CSV: class (1-4), title, description; a header row is skipped."""
    path = Path(path)
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if line == 1 and not row[0].strip().isdigit():
                continue  # e.g. Kaggle's "Class Index,Title,Description"
            if len(row) < 3 or row[0].strip() not in {"1", "2", "3", "4"}:
                raise ValueError(f"{path}:{line}: expected class (1-4),title,description; got {row[:3]}")
            labels.append(int(row[0]) - 1)
            # The distributed files write line breaks inside a text as a literal backslash.
            texts.append(" ".join(field.replace("\\", " ").strip() for field in row[1:]))
    return texts, labels


def read_imdb_split(root: str | Path, split: str) -> tuple[list[str], list[int]]:
    """(texts, labels) of ``root/split/{neg,pos}/*.txt``, files in sorted order; ``<br />`` becomes a space."""
    texts, labels = [], []
    for label, name in enumerate(IMDB_CLASSES):
        folder = Path(root) / split / name
        if not folder.is_dir():
            raise DataUnavailable(
                f"IMDB: {folder} is missing (expected aclImdb/{{train,test}}/{{pos,neg}}/*.txt)"
            )
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8").replace("<br />", " "))
            labels.append(label)
    return texts, labels


def from_hub(name: str) -> tuple[tuple[list, list], tuple[list, list]]:
    """((train texts, labels), (test texts, labels)) through Hugging Face datasets, when installed and online."""
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(
            f"--download for {name} uses the Hugging Face datasets package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as err:  # network and hub errors have many types; all mean "not here"
        raise DataUnavailable(f"could not load {name!r} from the Hugging Face hub: {err}") from err
    return tuple((list(ds[s]["text"]), [int(y) for y in ds[s]["label"]]) for s in ("train", "test"))


# -- bundles ------------------------------------------------------------------------------
def text_bundle(
    name: str,
    train: tuple[list[str], list[int]],
    test: tuple[list[str], list[int]],
    *,
    class_names: list[str],
    tokenizer: str,
    max_len: int,
    val_fraction: float,
    min_freq: int,
    max_vocab: int,
) -> DataBundle:
    """Hold out the validation split from train (fixed permutation), fit the tokenizer on the rest."""
    from afmp.data.images import split_indices  # the one split helper of the package

    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    texts, labels = train
    tr, va, _ = split_indices(len(labels), val_fraction=val_fraction, test_fraction=0.0)
    train_texts = [texts[i] for i in tr]
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "word":
        tok = WordTokenizer.fit(train_texts, max_size=max_vocab, min_freq=min_freq)
    else:
        raise ValueError(f"tokenizer must be byte or word, got {tokenizer!r}")

    def dataset(idx_texts, idx_labels):
        return TextDataset(idx_texts, idx_labels, max_len=max_len, encode=tok.encode)

    return DataBundle(
        name=name,
        train=dataset(train_texts, [labels[i] for i in tr]),
        val=dataset([texts[i] for i in va], [labels[i] for i in va]),
        test=dataset(*test),
        model_args={"vocab_size": tok.vocab_size, "num_classes": len(class_names), "max_len": max_len},
        class_names=class_names,
        collate_fn=pad_collate,
        info={"tokenizer": tokenizer, "vocab_size": tok.vocab_size},
    )


def _check_options(name: str, unknown: dict) -> None:
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {', '.join(sorted(unknown))}; "
            "valid: tokenizer (byte|word), max_len, min_freq, max_vocab"
        )


def find_agnews(data_dir: str | None) -> Path | None:
    for folder in (Path(data_dir), Path(data_dir) / "ag_news_csv") if data_dir else ():
        if (folder / "train.csv").exists() and (folder / "test.csv").exists():
            return folder
    return None


def find_imdb(data_dir: str | None) -> Path | None:
    for folder in (Path(data_dir) / "aclImdb", Path(data_dir)) if data_dir else ():
        if (folder / "train" / "pos").is_dir():
            return folder
    return None


@register_dataset("agnews")
def agnews(
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    tokenizer: str = "byte",
    max_len: int = 512,
    min_freq: int = 2,
    max_vocab: int = 50_000,
    **unknown,
) -> DataBundle:
    """AG News (120,000 train / 7,600 test news items, 4 classes); ``max_len`` in tokens."""
    _check_options("agnews", unknown)
    folder = find_agnews(data_dir)
    if folder is not None:
        train, test = read_agnews_csv(folder / "train.csv"), read_agnews_csv(folder / "test.csv")
    elif download:
        (train, test) = from_hub("ag_news")
    else:
        raise DataUnavailable(
            f"AG News needs train.csv and test.csv (class 1-4, title, description) in --data-dir "
            f"(got {data_dir}), or its ag_news_csv/ folder; or --download with `pip install datasets`"
        )
    return text_bundle(
        "agnews",
        train,
        test,
        class_names=AGNEWS_CLASSES,
        tokenizer=tokenizer,
        max_len=max_len,
        val_fraction=val_fraction,
        min_freq=min_freq,
        max_vocab=max_vocab,
    )


@register_dataset("imdb")
def imdb(
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    tokenizer: str = "byte",
    max_len: int = 2048,
    min_freq: int = 2,
    max_vocab: int = 50_000,
    **unknown,
) -> DataBundle:
    """IMDB reviews (25,000 train / 25,000 test, 2 classes); ``max_len`` in tokens."""
    _check_options("imdb", unknown)
    root = find_imdb(data_dir)
    if root is not None:
        train, test = read_imdb_split(root, "train"), read_imdb_split(root, "test")
    elif download:
        (train, test) = from_hub("imdb")
    else:
        raise DataUnavailable(
            f"IMDB needs the aclImdb/{{train,test}}/{{pos,neg}}/*.txt folders in --data-dir (got {data_dir}); "
            "or --download with `pip install datasets`"
        )
    return text_bundle(
        "imdb",
        train,
        test,
        class_names=IMDB_CLASSES,
        tokenizer=tokenizer,
        max_len=max_len,
        val_fraction=val_fraction,
        min_freq=min_freq,
        max_vocab=max_vocab,
    )
