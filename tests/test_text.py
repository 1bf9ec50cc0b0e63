"""Sequence classification: tokenizers, AG News / IMDB readers, padding, the two model families,
batch sizing, and `afmp train` on small files written in the real formats."""

import csv
import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

import afmp.models  # noqa: F401  (registers the presets)
from afmp import load_checkpoint
from afmp.data import DataUnavailable, build_dataset
from afmp.data import listops as L
from afmp.data.text import ByteTokenizer, WordTokenizer, pad_collate, read_agnews_csv, read_imdb_split
from afmp.models.text import NeighbourDiffusion, shift
from afmp.registry import create_model
from afmp.training.batch_size import find_batch_size, search_batch_size
from afmp.training.train import TrainConfig, train
from afmp.utils.errors import UsageError

TEXT_MODELS = ["diffusion_text", "transformer_text_matched"]
SMALL = {"embed_dim": 16, "num_iters": 2}


# -- files in the real formats ------------------------------------------------------------------
def write_agnews(folder, n_train=24, n_test=8):
    """AG News as distributed: no header, quoted fields, class 1-4, a backslash for line breaks."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["world peace talks", "football score", "stock market", "new chip"]
    for name, n in (("train.csv", n_train), ("test.csv", n_test)):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_ALL)
            for i in range(n):
                c = i % 4
                w.writerow([c + 1, f"{words[c]} {i}", f"Reuters - about {words[c]},\\again"])
    return folder


def write_imdb(root, per_class=6):
    for split in ("train", "test"):
        for label, name in enumerate(("neg", "pos")):
            folder = root / "aclImdb" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                text = ("awful, boring<br /><br />film" if label == 0 else "great fun film") + f" #{i}"
                text += " zzz" if split == "test" else ""  # a word the training split never has
                (folder / f"{i}_{3 + 6 * label}.txt").write_text(text, encoding="utf-8")
    return root


# -- tokenizers, readers, batches ---------------------------------------------------------------------
def test_byte_tokenizer_reserves_zero_for_padding():
    tok = ByteTokenizer()
    assert tok.encode("Ab é").tolist() == [66, 99, 33, 196, 170]  # UTF-8 bytes + 1
    assert tok.encode("").tolist() == [] and tok.vocab_size == 257


def test_word_tokenizer_fits_on_given_texts():
    tok = WordTokenizer.fit(["the cat sat.", "The dog sat!", "a cat's toy"], min_freq=2)
    assert tok.itos == ["<pad>", "<unk>", "sat", "the"]  # by frequency, ties alphabetical
    assert WordTokenizer.split("The cat's toy, no?") == ["the", "cat's", "toy", ",", "no", "?"]
    assert tok.encode("the bird sat").tolist() == [3, 1, 2]


def test_pad_collate_right_pads_with_zero():
    tokens, labels = pad_collate([(torch.tensor([5, 6, 7]), 1), (torch.tensor([9]), 0)])
    assert tokens.tolist() == [[5, 6, 7], [9, 0, 0]] and labels.tolist() == [1, 0]
    assert pad_collate([(torch.tensor([], dtype=torch.long), 2)])[0].tolist() == [[0]]


def test_agnews_reader(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"3","Wall St. Bears","Reuters - Short-sellers\\band of cynics"\n"1","A","B"\n')
    texts, labels = read_agnews_csv(path)
    assert labels == [2, 0]
    assert texts[0] == "Wall St. Bears Reuters - Short-sellers band of cynics"
    path.write_text("Class Index,Title,Description\n4,T,D\n")  # Kaggle's header is skipped
    assert read_agnews_csv(path) == (["T D"], [3])
    path.write_text('"5","T","D"\n')
    with pytest.raises(ValueError, match="class"):
        read_agnews_csv(path)


def test_imdb_reader(tmp_path):
    write_imdb(tmp_path, per_class=2)
    texts, labels = read_imdb_split(tmp_path / "aclImdb", "train")
    assert labels == [0, 0, 1, 1]
    assert texts[0] == "awful, boring  film #0" and texts[2] == "great fun film #0"


@pytest.mark.parametrize("tokenizer", ["byte", "word"])
def test_text_bundles(tmp_path, tokenizer):
    write_agnews(tmp_path / "ag" / "ag_news_csv")
    ag = build_dataset(
        "agnews", data_dir=str(tmp_path / "ag"), val_fraction=0.25, tokenizer=tokenizer, max_len=7
    )
    assert (len(ag.train), len(ag.val), len(ag.test)) == (18, 6, 8)
    assert ag.model_args["num_classes"] == 4 and ag.model_args["max_len"] == 7
    assert max(len(ag.train[i][0]) for i in range(len(ag.train))) == 7  # truncated
    write_imdb(tmp_path / "im")
    im = build_dataset("imdb", data_dir=str(tmp_path / "im" / "aclImdb"), tokenizer=tokenizer, min_freq=1)
    assert len(im.train) + len(im.val) == 12 and len(im.test) == 12
    if tokenizer == "byte":
        assert im.model_args["vocab_size"] == 257
        assert im.test[0][0][-3:].tolist() == [ord("z") + 1] * 3
    else:  # the vocabulary comes from the training split only: "zzz" is unknown
        assert all(WordTokenizer.UNK_ID not in im.train[i][0] for i in range(len(im.train)))
        assert im.test[0][0][-1] == WordTokenizer.UNK_ID


def test_text_data_errors(tmp_path):
    with pytest.raises(DataUnavailable, match="train.csv and test.csv"):
        build_dataset("agnews", data_dir=str(tmp_path))
    with pytest.raises(DataUnavailable, match="aclImdb"):
        build_dataset("imdb", data_dir=None)
    write_agnews(tmp_path)
    with pytest.raises(ValueError, match="valid: tokenizer"):
        build_dataset("agnews", data_dir=str(tmp_path), tokeniser="word")
    with pytest.raises(ValueError, match="byte or word"):
        build_dataset("agnews", data_dir=str(tmp_path), tokenizer="bpe")


# -- models -----------------------------------------------------------------------------------------
def test_shift_fills_with_zero_and_never_wraps():
    x = torch.arange(1.0, 5.0).view(1, 4, 1)
    assert shift(x, 1).flatten().tolist() == [2, 3, 4, 0]
    assert shift(x, -2).flatten().tolist() == [0, 0, 1, 2]
    assert shift(x, 9).abs().sum() == 0


def test_shift_moves_along_the_sequence_not_the_channels():
    """Offsets count positions (dim 1), also when there are fewer channels than positions
    and when the offset passes the sequence's end: 4 positions of 2 channels, literal."""
    x = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]]])
    assert shift(x, 2).tolist() == [[[3.0, -3.0], [4.0, -4.0], [0.0, 0.0], [0.0, 0.0]]]
    assert shift(x, -3).tolist() == [[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, -1.0]]]
    assert shift(x, 5).tolist() == [[[0.0, 0.0]] * 4]
    assert shift(x, -6).tolist() == [[[0.0, 0.0]] * 4]


def test_diffusion_step_has_bias_free_projections_and_a_hidden_layer_mlp_ratio_wide():
    """window 2: five bias-free D x D projections (the seed's, which the one-GEMM neighbour sum
    assumes); the update MLP's hidden width is int(dim * mlp_ratio) = 6 for 4 * 1.5."""
    step = NeighbourDiffusion(dim=4, window=2, alpha=0.5, mlp_ratio=1.5, dropout=0.0)
    assert [(name, tuple(p.shape)) for name, p in step.named_parameters()] == [
        ("proj.0.weight", (4, 4)),
        ("proj.1.weight", (4, 4)),
        ("proj.2.weight", (4, 4)),
        ("proj.3.weight", (4, 4)),
        ("proj.4.weight", (4, 4)),
        ("update.0.weight", (6, 4)),
        ("update.0.bias", (6,)),
        ("update.3.weight", (4, 6)),
        ("update.3.bias", (4,)),
        ("norm.weight", (4,)),
        ("norm.bias", (4,)),
    ]


def test_diffusion_window_one_is_the_seeds_left_self_right():
    """w = 1: sum_o W_o h_{i+o} is the seed's left, right and self projections (without wrap-around)."""
    model = create_model("diffusion_text", vocab_size=11, num_classes=3, embed_dim=8).double()
    step = model.step
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    left = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
    right = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], 1)
    expected = step.proj[0](left) + step.proj[1](h) + step.proj[2](right)
    torch.testing.assert_close(step.neighbour_sum(h, mask), expected)
    # A padded neighbour contributes nothing, like a position beyond the sequence.
    mask[:, 4:] = False
    got = step.neighbour_sum(h, mask)[:, :4]
    trimmed = step.neighbour_sum(h[:, :4], mask[:, :4])
    torch.testing.assert_close(got, trimmed)


def test_one_diffusion_step_matches_the_formula_in_float64():
    """LayerNorm(alpha h + (1 - alpha) MLP(sum_o W_o h_{i+o})) written out token by token with
    math, at alpha = 0.8 (so a step that swaps the two shares gives another answer); the last
    token is padding, and the first and last positions have a neighbour beyond the sequence."""
    torch.manual_seed(0)
    model = create_model("diffusion_text", vocab_size=11, num_classes=3, embed_dim=4, alpha=0.8, dropout=0.0)
    step = model.step.double().eval()
    for p in step.norm.parameters():  # not LayerNorm's identity start, so its scale and shift count
        torch.nn.init.normal_(p)
    h = torch.randn(1, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    got = step(h, mask)[0].tolist()

    def mat(linear):
        return linear.weight.tolist(), (linear.bias.tolist() if linear.bias is not None else None)

    def affine(w, b, v):
        return [sum(wij * vj for wij, vj in zip(row, v)) + (b[i] if b else 0.0) for i, row in enumerate(w)]

    tokens = [row if keep else [0.0] * 4 for row, keep in zip(h[0].tolist(), mask[0].tolist())]
    (w1, b1), (w2, b2) = mat(step.update[0]), mat(step.update[3])
    gamma, beta = step.norm.weight.tolist(), step.norm.bias.tolist()
    for i in range(5):
        s = [0.0] * 4
        for k, offset in enumerate((-1, 0, 1)):
            if 0 <= i + offset < 5:
                s = [a + b for a, b in zip(s, affine(step.proj[k].weight.tolist(), None, tokens[i + offset]))]
        hidden = [0.5 * z * (1 + math.erf(z / math.sqrt(2))) for z in affine(w1, b1, s)]  # exact GELU
        update = affine(w2, b2, hidden)
        v = [0.8 * a + 0.2 * u for a, u in zip(h[0, i].tolist(), update)]
        mean = sum(v) / 4
        var = sum((x - mean) ** 2 for x in v) / 4
        expected = [(x - mean) / math.sqrt(var + 1e-5) * g + b for x, g, b in zip(v, gamma, beta)]
        assert got[i] == pytest.approx(expected, abs=1e-12), f"token {i}"


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_logits_do_not_depend_on_padding(name):
    torch.manual_seed(0)
    opts = {"num_iters": 3, "window": 2} if name.startswith("diffusion") else {"num_layers": 2}
    model = create_model(name, vocab_size=50, num_classes=4, max_len=64, embed_dim=32, **opts).eval()
    seqs = [torch.randint(1, 50, (n,)) for n in (17, 5, 30)]
    short = pad_collate([(s, 0) for s in seqs])[0]  # padded to 30
    long = torch.cat([short, torch.zeros(3, 34, dtype=torch.long)], 1)  # padded to 64
    with torch.no_grad():
        a, b = model(short), model(long)
        alone = torch.cat([model(s[None]) for s in seqs])  # no padding at all
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 3, dtype=torch.long))).all()  # all padding


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_input_checks_and_example_input(name):
    model = create_model(name, vocab_size=30, num_classes=2, max_len=128)
    x = model.example_input(3, 100)
    assert x.shape == (3, 100) and x.dtype == torch.long and int(x.min()) >= 1
    assert model(x, return_aux=True)[1]["mask"].all()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        model(torch.full((1, 4), 30))


def test_transformer_position_table_limit_is_explained():
    model = create_model("transformer_text_matched", max_len=16)
    with pytest.raises(ValueError, match="max_len=20"):
        model(torch.ones(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=20"):
        model.example_input(1, 20)
    assert create_model("diffusion_text", max_len=16)(torch.ones(1, 20, dtype=torch.long)).shape == (1, 2)


def test_presets():
    d = create_model("diffusion_text").cfg
    assert (d.embed_dim, d.num_iters, d.alpha, d.window, d.noise_std) == (256, 4, 0.6, 1, 0.05)
    m = create_model("transformer_text_matched").cfg
    assert (m.embed_dim, m.num_layers, m.mlp_ratio) == (d.embed_dim, d.num_iters, d.mlp_ratio)
    b = create_model("transformer_text_distilbert").cfg
    assert (b.num_layers, b.embed_dim, b.num_heads, b.mlp_ratio) == (6, 768, 12, 4.0)
    with pytest.raises(ValueError, match="alpha"):
        create_model("diffusion_text", alpha=1.5)
    with pytest.raises(ValueError, match="divisible"):
        create_model("transformer_text_matched", num_heads=5)


# -- batch sizing ----------------------------------------------------------------------------------
def test_batch_size_search_halves_then_bisects():
    probed = []

    def fits(b):
        probed.append(b)
        if b > 100:
            raise torch.OutOfMemoryError("simulated")
        return b <= 77

    assert search_batch_size(fits, 512) == 72  # 512 OOM, 256 OOM, 128 OOM, 64 fits; 96, 80 fail, 72 fits
    assert probed == [512, 256, 128, 64, 96, 80, 72]
    assert search_batch_size(lambda b: True, 48) == 48
    assert search_batch_size(lambda b: b <= 5, 64) == 5
    assert search_batch_size(lambda b: False, 8) == 0


def test_batch_size_on_cpu_is_the_requested_one():
    lines = []
    model = create_model("diffusion_text", **SMALL)
    assert find_batch_size(model, None, max_batch=48, device=torch.device("cpu"), log=lines.append) == 48
    assert "not probed" in lines[0]


# -- training through afmp.training ---------------------------------------------------------------------------
def _train(tmp_path, model, dataset, data_dir, **kw):
    model_opts = (
        dict(SMALL) if model.startswith("diffusion") else {"embed_dim": 16, "num_layers": 1, "num_heads": 2}
    )
    cfg = TrainConfig(
        model=model,
        dataset=dataset,
        data_dir=str(data_dir),
        out=str(tmp_path / f"run-{model}-{dataset}"),
        epochs=1,
        batch_size=8,
        device="cpu",
        model_opts=model_opts,
        **kw,
    )
    results = train(cfg)
    run = tmp_path / f"run-{model}-{dataset}"
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    # The reported test accuracy is that of the saved weights on the test split, in batches of 8.
    data = build_dataset(dataset, data_dir=str(data_dir), val_fraction=0.1, seed=0, **kw.get("data_opts", {}))
    net, correct = load_checkpoint(run).eval(), 0
    with torch.no_grad():
        for tokens, labels in DataLoader(data.test, batch_size=8, collate_fn=data.collate_fn):
            correct += int((net(tokens).argmax(-1) == labels).sum())
    assert results["test_accuracy"] == pytest.approx(100.0 * correct / len(data.test))
    return results


def test_train_agnews_imdb_listops(tmp_path):
    write_agnews(tmp_path / "ag")
    r = _train(tmp_path, "diffusion_text", "agnews", tmp_path / "ag", data_opts={"max_len": 64})
    assert r["config"]["resolved_model"]["config"]["num_classes"] == 4
    write_imdb(tmp_path / "im")
    _train(
        tmp_path, "diffusion_text", "imdb", tmp_path / "im", data_opts={"tokenizer": "word", "min_freq": 1}
    )
    L.generate_files(tmp_path / "lo", num_train=16, num_val=4, num_test=4, min_length=10, max_length=40)
    r = _train(tmp_path, "diffusion_text", "listops", tmp_path / "lo", auto_batch=True)
    assert r["config"]["resolved_model"]["config"]["vocab_size"] == len(L.VOCAB)
    r = _train(tmp_path, "transformer_text_matched", "listops", tmp_path / "lo")
    longest = max(
        len(L.encode(s)) for split in L.SPLITS for s in L.read_tsv(tmp_path / "lo" / f"basic_{split}.tsv")[0]
    )
    assert r["config"]["resolved_model"]["config"]["max_len"] == longest  # the position table fits the data


@pytest.mark.parametrize("name", ["diffusion_text", "transformer_text_matched"])
def test_forward_head_with_the_padding_mask_is_forward(name):
    from afmp.models.text import PAD_ID

    torch.manual_seed(0)
    model = afmp.create_model(name, vocab_size=50, max_len=16).eval()
    x = torch.randint(1, 50, (3, 12))
    x[0, 7:] = PAD_ID  # padded: the pooling must skip these
    x[1, 3:] = PAD_ID
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features, mask=x != PAD_ID), logits)
        # Without the mask the padding is pooled too: only the unpadded row agrees.
        unmasked = model.forward_head(features)
        torch.testing.assert_close(unmasked[2], logits[2])
        assert not torch.allclose(unmasked[:2], logits[:2])


def test_group_by_length_trains_on_batches_of_similar_length(tmp_path, monkeypatch):
    from afmp.measure import roofline
    from afmp.models.text import PAD_ID
    from afmp.training import run as train_module
    from afmp.training.epoch import flops_per_train_image

    L.generate_files(tmp_path / "lo", num_train=64, num_val=4, num_test=4, min_length=10, max_length=60)
    seen, original = {}, train_module.train_one_epoch

    def recording(model, loader, *args, **kwargs):
        seen["batches"] = list(loader)
        return original(model, seen["batches"], *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", recording)
    # A made-up peak of 1e9 FLOP/s, so that the epochs report an MFU.
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = roofline._cache_key(torch.device("cpu"), torch.float32)
    (tmp_path / "cache" / "roofline.json").write_text(json.dumps({key: {"peak_flops_per_s": 1e9}}))
    examples, padded = {}, {}
    for grouped in (False, True):
        r = _train(
            tmp_path / str(grouped), "diffusion_text", "listops", tmp_path / "lo", group_by_length=grouped
        )
        assert r["config"]["group_by_length"] is grouped
        batches = seen.pop("batches")
        examples[grouped] = sorted(
            tuple(row[row != PAD_ID].tolist()) for tokens, _ in batches for row in tokens
        )
        padded[grouped] = sum(tokens.numel() for tokens, _ in batches)
        # MFU counts the FLOPs of an example of the data's longest length, scaled by the length fed.
        longest = r["config"]["resolved_model"]["config"]["max_len"]
        net = load_checkpoint(tmp_path / str(grouped) / "run-diffusion_text-listops")
        flops = flops_per_train_image(
            net, lambda b, net=net, n=longest: (net.example_input(b, n), torch.zeros(b, dtype=torch.long))
        )
        history, fill = r["training_history"], padded[grouped] / (64 * longest)
        assert history["mfu"][0] == pytest.approx(flops * fill * history["images_per_s"][0] / 1e9, rel=1e-6)
    # The same 64 examples, in batches padded to about their own lengths: fewer padded tokens.
    assert examples[True] == examples[False] and len(examples[True]) == 64
    assert padded[True] < 0.8 * padded[False]
    with pytest.raises(UsageError, match="needs a data set of sequences"):
        train(TrainConfig(dataset="digits", out=str(tmp_path / "img"), epochs=1, group_by_length=True))
