"""`afmp bench sets` (afmp.bench.sets): point-set models on synthetic sets of growing size, the
scaffold's construction timed apart, and exponents fitted to the measured numbers."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import afmp
import afmp_cli
from afmp.bench import cli as bench_cli
from afmp.bench import sets
from afmp.data.points.sets import point_graph
from afmp.measure import roofline, timing

pytestmark = pytest.mark.usefixtures("one_thread", "fast_calibration")


def points_of(fn) -> int:
    """The points per set of what a timer is handed: a scaffold build or a model's step."""
    return fn.args[1].shape[0] if fn.func is sets.build_into else fn.args[0]["features"].shape[1]


def step_ms(n):  # a known law, except at the smallest size, which the fit must leave out
    return 1e3 if n == 100 else 2e-3 * n**1.25


@pytest.fixture
def known_clocks(monkeypatch):
    """Timers and a memory probe that run what they are handed and report known laws of N;
    returns the batches the models' timed steps were given, by points per set."""
    batches = {}

    def time_step_ms(fn, device):
        fn()
        if fn.func is sets.build_into:
            return 0.5 * points_of(fn) ** 1.5
        batches[points_of(fn)] = fn.args[0]
        return step_ms(points_of(fn))

    def peak_step_mb(fn, device, baseline):
        fn()
        return 0.01 * points_of(fn) ** 0.9, "known"

    monkeypatch.setattr(timing, "time_step_ms", time_step_ms)
    monkeypatch.setattr(timing, "peak_step_mb", peak_step_mb)
    return batches


def test_the_bench_fits_exponents_to_the_numbers_it_measured(tmp_path, known_clocks, capsys, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")  # recorded: it changes CPU times
    out = tmp_path / "sets"
    argv = ["bench", "sets", "--models", "afmp_points,graph_gat", "--points", "100,200,300,400"]
    argv += ["--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]
    assert afmp_cli.main(argv) == 0
    with open(out / "sets.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == sets.COLUMNS
        rows = list(reader)
    assert [(r["model"], r["resolution"], r["tokens"]) for r in rows] == [
        (m, n, n) for n in ("100", "200", "300", "400") for m in ("afmp_points", "graph_gat")
    ]
    for r in rows:
        n = int(r["tokens"])
        # The scaffold is the data pipeline's, built for the bench's own set of n points, and
        # the models are timed on that set and that scaffold.
        positions = sets.synthetic_positions("uniform", 2, n)
        graph = point_graph(positions.astype(np.float64))
        batch = known_clocks[n]
        assert batch["features"].shape == (1, n, 3) and np.array_equal(batch["positions"][0], positions)
        for key in ("neighbors", "mask", "length"):
            np.testing.assert_allclose(batch[key][0].numpy(), graph[key], rtol=1e-6, err_msg=key)
        assert (r["layout"], r["dim"], r["graph"]) == ("uniform", "2", "delaunay")
        assert (int(r["edges"]), int(r["max_degree"])) == (graph["mask"].sum(), graph["mask"].shape[1])
        assert float(r["scaffold_ms"]) == pytest.approx(0.5 * n**1.5)
        assert float(r["ms_median"]) == pytest.approx(step_ms(n)) and float(r["peak_mb"]) == pytest.approx(
            0.01 * n**0.9
        )
        model = afmp.create_model(r["model"], num_classes=10)  # the presets, as trained on superpixels
        assert int(r["params"]) == sum(p.numel() for p in model.parameters())
    with open(out / "fits.csv") as f:
        fits = {fit["series"]: fit for fit in csv.DictReader(f)}
    assert list(fits) == ["scaffold (delaunay)", "afmp_points", "graph_gat"]
    scaffold = fits["scaffold (delaunay)"]
    assert float(scaffold["time_exp"]) == pytest.approx(1.5)
    assert scaffold["memory_exp"] == scaffold["flops_exp"] == "nan"  # not measured
    for model in ("afmp_points", "graph_gat"):
        fit = fits[model]
        assert (fit["sizes"], fit["from_points"], fit["to_points"]) == ("3", "200", "400")
        assert float(fit["time_exp"]) == pytest.approx(1.25) and float(fit["memory_exp"]) == pytest.approx(
            0.9
        )
        # FLOPs are counted, not known: the exponent is the least-squares slope through the rows'.
        mine = [r for r in rows if r["model"] == model][1:]
        x, y = np.log([float(r["tokens"]) for r in mine]), np.log([float(r["total_gflops"]) for r in mine])
        assert float(fit["flops_exp"]) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    printed = capsys.readouterr().out
    assert "| afmp_points | uniform | 2 | 200–400 | 1.25 | 0.90 |" in printed
    config = json.loads((out / "bench_config.json").read_text())
    assert config["layouts"] == ["uniform"] and config["allocator_env"] == {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"
    }
    assert (out / "time_vs_points.png").read_bytes()[:4] == b"\x89PNG"


def test_every_layout_and_dimension_is_its_own_series(tmp_path, known_clocks):
    argv = [
        "bench",
        "sets",
        "--device",
        "cpu",
        "--models",
        "afmp_points",
        "--points",
        "50,60",
        "--batch-size",
        "2",
    ]
    cfg = bench_cli.config_from_args(afmp_cli.build_parser(["bench"]).parse_args(argv))
    calib = roofline.load_or_calibrate(torch.device("cpu"), torch.float32)
    rows = sets.run_sets(cfg, ["uniform", "clustered"], [2, 3], "knn", calib, log=lambda *a, **k: None)
    assert [(r["layout"], r["dim"], r["tokens"]) for r in rows] == [
        (layout, dim, n) for layout in ("uniform", "clustered") for dim in (2, 3) for n in (50, 60)
    ]
    for r in rows:
        graph = point_graph(
            sets.synthetic_positions(r["layout"], r["dim"], r["tokens"]).astype(np.float64), "knn"
        )
        assert (r["edges"], r["max_degree"], r["graph"]) == (
            graph["mask"].sum(),
            graph["mask"].shape[1],
            "knn",
        )
    fits = sets.fits(rows)
    assert [(f["series"], f["layout"], f["dim"]) for f in fits] == [
        (name, layout, dim)
        for layout in ("uniform", "clustered")
        for dim in (2, 3)
        for name in ("scaffold (knn)", "afmp_points")
    ]
    assert all(f["time_exp"] == pytest.approx(1.5 if f["series"] == "scaffold (knn)" else 1.25) for f in fits)


def test_the_synthetic_sets_are_seeded_and_the_clusters_are_denser():
    a = sets.synthetic_positions("clustered", 3, 500)
    np.testing.assert_array_equal(a, sets.synthetic_positions("clustered", 3, 500))
    assert a.shape == (500, 3) and a.dtype == np.float32
    uniform = sets.synthetic_positions("uniform", 3, 500)
    assert not np.array_equal(uniform, a) and not np.array_equal(
        uniform[:400], sets.synthetic_positions("uniform", 3, 400)
    )
    # 16 blobs of std 0.03 hold the same points far closer together than the unit cube does.
    from afmp.data.points.sets import nearest

    assert nearest(a.astype(np.float64))[0].mean() < 0.5 * nearest(uniform.astype(np.float64))[0].mean()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert (
        afmp_cli.main(["bench", "sets", "--models", "afmp_tiny", "--device", "cpu", "--out", str(out)]) == 2
    )
    assert (
        "afmp bench sets measures point-set models (afmp_points, graph_*), not 'afmp_tiny'"
        in capsys.readouterr().err
    )
    for argv, complaint in [
        (["--points", "100,2"], "expected comma-separated point counts of at least 3, got '100,2'"),
        (["--layouts", "grid"], "expected comma-separated names from uniform, clustered, got 'grid'"),
        (["--dims", "4"], "expected comma-separated names from 2, 3, got '4'"),
    ]:
        with pytest.raises(SystemExit):
            afmp_cli.main(["bench", "sets", *argv, "--out", str(out)])
        assert complaint in capsys.readouterr().err
    assert not out.exists()
    assert math.isnan(sets.exponent([{"tokens": 10, "x": 1.0}], "x"))  # one size: no slope
