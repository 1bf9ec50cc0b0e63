"""ListOps: LRA's generator, evaluator, file format, reader, and the `afmp listops` command."""

import random

import pytest
import torch

from afmp.data import DataUnavailable, build_dataset
from afmp.data import listops as L
from afmp_cli import main as cli_main


@pytest.mark.parametrize(
    "source, value",
    [
        ("[MAX 2 9 ]", 9),
        ("[MIN 4 7 3 ]", 3),
        ("[SM 7 8 9 ]", 4),  # 24 mod 10
        ("[MED 1 5 9 ]", 5),
        ("[MED 1 2 ]", 1),  # even count: int(1.5)
        ("[MED 3 8 1 6 ]", 4),  # middle values 3 and 6: int(4.5)
        ("[MED 2 4 ]", 3),
        ("[FIRST 4 1 ]", 4),
        ("[LAST 4 1 ]", 1),
        ("[MAX 2 [MIN 4 7 ] 0 ]", 4),
        ("[SM [MED 9 9 0 1 ] [MAX 3 8 ] 7 ]", 0),  # MED -> int(5.0) = 5; 5 + 8 + 7 = 20
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # LRA's rendering of [MAX 2 9]
        ("7", 7),
    ],
)
def test_evaluate_literals(source, value):
    assert L.expression_value(source) == value


@pytest.mark.parametrize("bad", ["", "[MAX 2 9", "[MAX ]", "2 3", "[MAX 2 ] 3", "[FOO 1 2 ]", "] 2"])
def test_evaluate_rejects_malformed(bad):
    with pytest.raises(ValueError):
        L.expression_value(bad)


def test_to_source_is_lras_rendering():
    tree = ("[MAX", (2, ("[MIN", (4, 7)), 0))
    assert L.to_source(tree) == "( ( ( ( [MAX 2 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
    assert L.tree_value(tree) == 4 == L.expression_value(L.to_source(tree))


def test_median_matches_numpy_int_median():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for _ in range(300):
        args = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        assert L.apply_operator("[MED", args) == int(np.median(args))


def test_generated_files_are_correct_and_in_lras_format(tmp_path):
    settings = L.generate_files(
        tmp_path, num_train=60, num_val=10, num_test=15, min_length=20, max_length=60, seed=3
    )
    assert settings["num_train"] == 60
    seen = set()
    for split, n in (("train", 60), ("val", 10), ("test", 15)):
        raw = (tmp_path / f"basic_{split}.tsv").read_bytes()
        lines = raw.split(b"\r\n")
        assert lines[0] == b"Source\tTarget" and lines[-1] == b""  # CRLF, like Python's csv (LRA's files)
        rows = [line.split(b"\t") for line in lines[1:-1]]
        assert len(rows) == n and all(len(r) == 2 for r in rows)
        sources, targets = L.read_tsv(tmp_path / f"basic_{split}.tsv")
        for source, target in zip(sources, targets):
            assert target == L.expression_value(source)
            length = sum(tok not in L.PARENS for tok in source.split())
            assert 20 < length < 60
            assert source.startswith("(") and "[" in source
        seen.update(sources)
    assert len(seen) == 85  # unique across the splits


def test_generation_is_seeded_and_cut_trees_keep_the_distribution(tmp_path):
    a = L.generate(20, min_length=10, max_length=40, seed=7)
    assert a == L.generate(20, min_length=10, max_length=40, seed=7)
    assert a != L.generate(20, min_length=10, max_length=40, seed=8)
    # Abandoning over-long trees early draws exactly what LRA's uncut generator accepts:
    # replay the same random stream without the cut and keep what the window accepts.
    rng, uncut = random.Random(7), {}
    while len(uncut) < 20:
        state = rng.getstate()
        tree, length = L.generate_tree(rng, 1, 10, 10)
        if length >= 40:
            # The cut generator stopped drawing at the length limit: resynchronise the stream.
            rng.setstate(state)
            with pytest.raises(L._TooLong):
                L.generate_tree(rng, 1, 10, 10, 40)
            continue
        if 10 < length < 40:
            uncut[tree] = None
    assert [L.to_source(t) for t in uncut] == [s for s, _ in a]


def test_generate_rejects_impossible_window():
    with pytest.raises(ValueError, match="strictly between"):
        L.generate(5, min_length=10, max_length=11)
    with pytest.raises(ValueError, match="widen the window"):
        L.generate(5, min_length=50, max_length=60, max_depth=2, max_args=3, max_tries=200)


def test_reader_uses_one_fixed_vocabulary(tmp_path):
    (tmp_path / "basic_train.tsv").write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n")
    (tmp_path / "basic_val.tsv").write_text(
        "Target\tSource\n3\t( ( ( [MIN 3 ) 4 ) ] )\n"
    )  # other column order
    (tmp_path / "basic_test.tsv").write_text("Source\tTarget\n( ( ( [SM 9 ) 9 ) ] )\t8\n")
    bundle = build_dataset("listops", data_dir=str(tmp_path), val_fraction=0.1, seed=5)
    tid = L.TOKEN_ID
    # The ids depend only on the token, never on which split it was first seen in.
    assert bundle.train[0][0].tolist() == [tid["[MAX"], tid["2"], tid["9"], tid["]"]]
    assert bundle.val[0][0].tolist() == [tid["[MIN"], tid["3"], tid["4"], tid["]"]]
    assert bundle.test[0][0].tolist() == [tid["[SM"], tid["9"], tid["9"], tid["]"]]
    assert [int(bundle.val[0][1]), int(bundle.test[0][1])] == [3, 8]
    assert bundle.model_args == {"vocab_size": len(L.VOCAB), "num_classes": 10, "max_len": 4}
    assert L.encode("( [MAX 2 ) ] )", keep_parens=True) == [
        tid["("],
        tid["[MAX"],
        tid["2"],
        tid[")"],
        tid["]"],
        tid[")"],
    ]
    with pytest.raises(ValueError, match="unknown ListOps token"):
        L.encode("[MAX 2 10 ]")


def test_reader_errors_say_what_was_expected(tmp_path):
    with pytest.raises(DataUnavailable, match="afmp listops generate"):
        build_dataset("listops", data_dir=str(tmp_path))
    (tmp_path / "bad.tsv").write_text("Input\tLabel\n1\t1\n")
    with pytest.raises(ValueError, match="Source and Target"):
        L.read_tsv(tmp_path / "bad.tsv")
    (tmp_path / "bad.tsv").write_text("Source\tTarget\n[MAX 2 9 ]\t12\n")
    with pytest.raises(ValueError, match="digit 0-9"):
        L.read_tsv(tmp_path / "bad.tsv")


def test_no_data_dir_generates_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AFMP_CACHE", str(tmp_path))
    opts = dict(num_train=12, num_val=4, num_test=4, min_length=10, max_length=30)
    bundle = build_dataset("listops", **opts)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 4, 4)
    files = sorted(p.name for p in (tmp_path / "listops").rglob("*.tsv"))
    assert files == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    again = build_dataset("listops", **opts)  # read back, not regenerated
    assert torch.equal(again.train[0][0], bundle.train[0][0])
    with pytest.raises(ValueError, match="unknown listops option"):
        build_dataset("listops", num_trian=5)


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "lo"
    args = ["listops", "generate", "--out", str(out), "--train", "8", "--val", "2", "--test", "3"]
    assert cli_main([*args, "--min-length", "5", "--max-length", "25", "--seed", "1"]) == 0
    assert "wrote 8 / 2 / 3 examples of length 6-24" in capsys.readouterr().out
    sources, targets = L.read_tsv(out / "basic_test.tsv")
    assert len(sources) == 3 and all(L.expression_value(s) == t for s, t in zip(sources, targets))
    assert cli_main([*args, "--min-length", "5", "--max-length", "6"]) == 2  # a clean error
    assert "strictly between" in capsys.readouterr().err


def test_baselines_fit_the_majority_and_the_root_operator_rule_on_train(tmp_path, capsys):
    train = (
        ["[MAX 1 9 ]", "( [MAX 2 3 ] )", "[MAX 9 [MIN 0 1 ] ]", "[MIN 4 5 ]", "[MIN 7 8 ]", "[SM 1 1 ]"],
        [9, 3, 9, 4, 7, 2],
    )
    evaluated = (["[MAX 0 9 ]", "[MIN 4 6 ]", "[MED 1 2 3 ]", "[SM 5 5 ]"], [9, 4, 2, 0])
    # majority 9 everywhere: right once. Rule MAX->9, MIN->4 (a tie: the smaller), SM->2, and
    # the unseen MED falls back to the majority: right twice.
    assert L.baselines(train, evaluated) == {"majority": 25.0, "root_operator": 50.0}
    assert L.root_operator("( ( [SM 1 [MAX 2 ] ) ] )") == "[SM"
    for split, rows in (("train", train), ("val", evaluated), ("test", evaluated)):
        L.write_tsv(tmp_path / f"basic_{split}.tsv", list(zip(*rows)))
    assert cli_main(["listops", "baselines", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test: majority class 25.00%  root-operator rule 50.00%  (4 examples)" in out
    assert cli_main(["listops", "baselines", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no basic_train.tsv" in capsys.readouterr().err
