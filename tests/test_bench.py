"""afmp bench: exact cost counts on hand-sized ops, the OOM path, the output schema, end to end."""

import csv
import json
import os
from dataclasses import dataclass
from functools import partial

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import afmp
import afmp_cli
from afmp import registry
from afmp.bench import baselines, cli, plots, scaling
from afmp.measure import counting, roofline, timing
from afmp.training.checkpoint import save_checkpoint
from afmp.utils.files import write_json

REQUIRED = (
    "model resolution tokens batch_size mode dtype device params matmul_gflops total_gflops gbytes "
    "ms_median ms_min ms_max peak_mb roofline_ms oom"
).split()


pytestmark = pytest.mark.usefixtures("one_thread", "fast_calibration")


# -- counting: hand counts ------------------------------------------------------------------
def test_compiled_bytes_are_what_the_fused_kernel_reads_and_writes():
    from afmp.bench.compiled_bytes import compiled_bytes

    torch._dynamo.reset()
    x = torch.randn(1000)
    step = torch.compile(lambda x: (x * 2).sin().square())  # one fused kernel: read x, write out
    with compiled_bytes() as counted:
        step(x)
    assert counted.bytes == 2 * 1000 * 4
    assert counting.count(lambda: (x * 2).sin().square()).bytes == 3 * 2 * 4000  # eager: three ops


def test_ops_count_every_dispatched_op_views_included():
    x = torch.randn(4, 5)
    assert counting.count(lambda: (x * 2).sin().square()).ops == 3
    assert counting.count(lambda: x.t().reshape(5, 4)[1:]).ops == 3  # t, view, slice: no bytes, still ops
    w = torch.randn(3, 5)
    assert counting.count(lambda: torch.nn.functional.linear(x, w)).ops == 2  # t, mm


def test_linear_counts_matmul_flops_and_every_operand_byte():
    lin = nn.Linear(5, 7)
    x = torch.randn(3, 5)
    c = counting.count(lambda: lin(x))
    assert c.matmul_flops == 2 * 3 * 5 * 7
    assert c.total_flops == 2 * 3 * 5 * 7  # the bias add is inside addmm, as FlopCounterMode counts it
    assert c.bytes == 4 * (3 * 5 + 5 * 7 + 7 + 3 * 7)  # input + weight + bias + output, float32


def test_gather_counts_one_flop_per_element_gathered():
    x, idx = torch.randn(10, 4), torch.tensor([0, 3, 3, 9, 1, 2])
    for gather in (lambda: x.index_select(0, idx), lambda: x[idx]):
        c = counting.count(gather)
        assert (c.matmul_flops, c.total_flops) == (0, 6 * 4)
        assert c.bytes == 4 * 10 * 4 + 8 * 6 + 4 * 6 * 4  # source + int64 index + output


def test_index_add_counts_one_flop_per_source_element_and_reads_and_writes_the_target():
    target, idx, src = torch.zeros(5, 4), torch.tensor([0, 1, 1, 4, 2, 0]), torch.randn(6, 4)
    c = counting.count(lambda: target.index_add_(0, idx, src))
    assert (c.matmul_flops, c.total_flops) == (0, 6 * 4)
    assert c.bytes == 4 * 5 * 4 + 8 * 6 + 4 * 6 * 4 + 4 * 5 * 4  # target read, index, source, target written


def test_pointwise_views_and_expanded_inputs():
    x, row = torch.randn(4, 5), torch.randn(1, 5)
    c = counting.count(lambda: x + row.expand(4, 5))
    assert (c.total_flops, c.bytes) == (20, 4 * (20 + 5 + 20))  # the expanded row is read once
    assert counting.count(lambda: x.t().reshape(5, 4)[1:]).bytes == 0  # views move nothing
    assert counting.tensor_bytes(torch.zeros(1, 5, dtype=torch.bfloat16).expand(3, 5)) == 10


def test_reduction_and_softmax():
    x = torch.randn(6, 8)
    assert counting.count(lambda: x.sum(1)).total_flops == 48
    assert counting.count(lambda: x.softmax(-1)).total_flops == 5 * 48


@torch.library.custom_op("afmp_bench_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_fused_custom_op_costs_its_operands_and_the_flops_registered_for_it(monkeypatch):
    x = torch.randn(3, 4)
    c = counting.count(lambda: _twice(x))
    assert (c.total_flops, c.bytes) == (0, 2 * 4 * 12)  # opaque: its inner mul is not seen
    monkeypatch.setattr(counting, "CUSTOM_FLOPS", {})  # the registration ends with the test
    counting.register_flops(torch.ops.afmp_bench_test.twice, lambda x, out: out.numel())
    assert counting.count(lambda: _twice(x)).total_flops == 12


def _deit(fused: bool):
    torch.manual_seed(0)
    model, _ = baselines.BASELINES["deit_tiny_sdpa" if fused else "deit_tiny_unfused"](32, 10, "cpu")
    return model


def _train_step(model, x):
    return lambda: model(x).sum().backward()


def test_matmul_flops_agree_with_flop_counter_mode_and_fused_equals_unfused():
    x = torch.randn(2, 3, 32, 32)
    fused, unfused = _deit(True), _deit(False)
    ours = counting.count(_train_step(fused, x))
    with FlopCounterMode(display=False, custom_mapping=counting.EXTRA_MATMUL) as ref:
        _train_step(fused, x)()
    assert ours.matmul_flops == ref.get_total_flops()
    # The CPU flash kernel counts the unfused path's matmuls, plus the backward's recomputation
    # of q k^T: one (B, H, N, N, d) matmul per layer (12 layers, B 2, 3 heads, N 5 tokens, d 64).
    recompute = 12 * 2 * 2 * 3 * 5 * 5 * 64
    assert ours.matmul_flops - counting.count(_train_step(unfused, x)).matmul_flops == recompute
    assert ours.total_flops > ours.matmul_flops > 0


def _config(**kw):
    base = dict(models=["afmp_tiny"], resolutions=[32], batch_size=3, repeats=1, warmup=0, device="cpu")
    return scaling.BenchConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["afmp_tiny", "deit_tiny_sdpa"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_batch_extrapolation_is_exact(name, mode):
    cfg = _config(mode=mode)
    bm = scaling.build(scaling.parse_spec(name), 32, 10, {}, torch.device("cpu"))
    bm.module.train(mode == "train")

    def make(b):
        return partial(
            scaling.make_step(bm, bm.module, cfg, torch.device("cpu")), scaling.make_input(bm, b, cfg)
        )

    direct, extrapolated = counting.count(make(5)), counting.count_step(make, 5)
    assert (direct.matmul_flops, direct.total_flops, direct.bytes, direct.ops) == (
        extrapolated.matmul_flops,
        extrapolated.total_flops,
        extrapolated.bytes,
        extrapolated.ops,
    )


# -- specs, baselines --------------------------------------------------------------------------
def test_model_specs():
    spec = scaling.parse_spec("afmp_tiny@sparsity=0@compile=true")
    assert (spec.name, spec.options, spec.compile) == ("afmp_tiny", {"sparsity": 0}, True)
    assert scaling.parse_spec("vit_natten_flex@window=9").options == {"window": 9}
    with pytest.raises(ValueError, match="unknown model"):
        scaling.parse_spec("no_such_model")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        scaling.parse_spec("afmp_tiny@sparsity")
    with pytest.raises(ValueError, match="unknown option"):
        scaling.build(scaling.parse_spec("afmp_tiny@nonsense=1"), 32, 10, {}, torch.device("cpu"))


def test_neighbourhood_mask_is_natten_window():
    h, w, k = 4, 5, 3
    idx = torch.arange(h * w)
    mask = baselines.neighbourhood_mask_mod(h, w, k)(0, 0, idx[:, None], idx[None, :])
    assert mask.sum(1).tolist() == [k * k] * (h * w)  # the window shifts inwards at the borders
    assert idx[mask[0]].tolist() == [0, 1, 2, 5, 6, 7, 10, 11, 12]  # corner (0, 0): rows 0-2, cols 0-2
    assert idx[mask[7]].tolist() == [1, 2, 3, 6, 7, 8, 11, 12, 13]  # (1, 2): centred


def test_deit_baselines_switch_timm_attention():
    assert all(b.attn.fused_attn for b in _deit(True).blocks)
    assert not any(b.attn.fused_attn for b in _deit(False).blocks)
    assert isinstance(_deit(True), timm.models.vision_transformer.VisionTransformer)


# -- the study ---------------------------------------------------------------------------------
class _OOMAfter(nn.Module):
    """A model whose forward raises CUDA's out-of-memory error from call ``after`` on."""

    def __init__(self, after: int):
        super().__init__()
        self.lin, self.calls, self.after = nn.Linear(3, 10), 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return self.lin(x.mean((2, 3)))


@pytest.mark.parametrize("after", [0, 2])  # 0: while counting; 2: while timing (count 1, memory 1)
def test_out_of_memory_is_a_row_and_the_run_goes_on(monkeypatch, after):
    monkeypatch.setitem(scaling.BASELINES, "oom_model", lambda size, nc, device: (_OOMAfter(after), 4))
    cfg = _config(models=["oom_model", "afmp_tiny"], resolutions=[32, 64], repeats=2)
    rows = scaling.run_scaling(cfg, roofline.load_or_calibrate(torch.device("cpu"), torch.float32))
    assert [(r["model"], r["resolution"]) for r in rows] == [
        ("oom_model", 32),
        ("afmp_tiny", 32),
        ("oom_model", 64),
        ("afmp_tiny", 64),
    ]
    for r in rows:
        if r["model"] == "oom_model":
            assert r["oom"] is True and r["note"] == "out of memory" and r["ms_median"] != r["ms_median"]
        else:
            assert r["oom"] is False and r["ms_median"] > 0 and r["repeats"] == 2


@dataclass
class _SeqConfig:
    max_len: int = 16
    vocab_size: int = 11
    num_classes: int = 3


class _TinySeq(nn.Module):
    """A sequence model as the text helpers register them: example_input(batch, length)."""

    Config = _SeqConfig

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb, self.head = nn.Embedding(cfg.vocab_size, 8), nn.Linear(8, cfg.num_classes)

    def forward(self, x, return_aux=False):
        logits = self.head(self.emb(x).mean(1))
        return (logits, {}) if return_aux else logits

    def example_input(self, batch_size=2, size=None):
        return torch.randint(0, self.cfg.vocab_size, (batch_size, size or self.cfg.max_len))


def test_sequence_models_scale_through_max_len(monkeypatch):
    monkeypatch.setitem(registry._MODELS, "tiny_seq_bench", (_TinySeq, {}))
    cfg = _config(models=["tiny_seq_bench", "afmp_tiny"], resolutions=[32], seq_lengths=[8, 24])
    rows = scaling.run_scaling(cfg, roofline.load_or_calibrate(torch.device("cpu"), torch.float32))
    seq = [(r["resolution"], r["tokens"]) for r in rows if r["model"] == "tiny_seq_bench"]
    assert seq == [(8, 8), (24, 24)]
    assert [(r["resolution"], r["tokens"]) for r in rows if r["model"] == "afmp_tiny"] == [(32, 16)]
    assert all(r["note"] == "" and r["total_gflops"] > 0 for r in rows)


def test_bench_end_to_end_writes_every_file(tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--models", "afmp_tiny,deit_tiny_unfused", "--resolutions", "32,64", "--batch-size", "2"]
    argv += ["--repeats", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]
    assert afmp_cli.main(argv) == 0
    for name in ("scaling.csv", "scaling.json", "bench_config.json", "time_vs_tokens.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "memory_vs_tokens.png").exists() and (out / "latency_vs_flops.png").exists()
    with open(out / "scaling.csv") as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED) <= set(reader.fieldnames)
        rows = list(reader)
    assert [(r["model"], r["resolution"], r["tokens"]) for r in rows] == [
        ("afmp_tiny", "32", "16"),
        ("deit_tiny_unfused", "32", "4"),
        ("afmp_tiny", "64", "64"),
        ("deit_tiny_unfused", "64", "16"),
    ]
    records = json.loads((out / "scaling.json").read_text())
    assert [r["model"] for r in records] == [r["model"] for r in rows]
    config = json.loads((out / "bench_config.json").read_text())
    assert config["config"]["resolutions"] == [32, 64]
    calib = config["calibration"]
    num_classes = config["config"]["num_classes"]
    afmp_params = sum(p.numel() for p in afmp.create_model("afmp_tiny", num_classes=num_classes).parameters())
    for r in records:
        assert r["oom"] is False and r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert r["total_gflops"] >= r["matmul_gflops"] > 0 and r["gbytes"] > 0
        # The roofline: every flop at the calibrated matmul rate or every byte at copy speed, the slower.
        bound_s = max(
            r["total_gflops"] * 1e9 / calib["peak_flops_per_s"], r["gbytes"] * 1e9 / calib["copy_bytes_per_s"]
        )
        assert r["roofline_ms"] == pytest.approx(1e3 * bound_s, rel=1e-9)
        assert r["peak_source"] in ("rss_hwm_delta", "unavailable")
    assert [r["params"] for r in records if r["model"] == "afmp_tiny"] == [afmp_params] * 2
    # AFMP's work is per token and per edge: 4x the tokens, about 4x the matmul flops (the head's
    # per-image matmul aside).
    small, large = (r["matmul_gflops"] for r in records if r["model"] == "afmp_tiny")
    assert 3.5 < large / small <= 4.0


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert afmp_cli.main(["bench", "--models", "nope", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode"):
        _config(mode="backward")


def test_bench_studies_are_sub_parsers_with_their_own_options(capsys):
    def parse(*argv):
        return afmp_cli.build_parser(["bench"]).parse_args(["bench", *argv])

    bare = parse()
    assert (bare.study, bare.device, bare.mode, bare.runs) == ("scaling", "auto", "train", None)
    # `afmp bench OPTIONS` is the scaling study; an option before the study's name is kept.
    assert parse("--models", "a", "--device", "cpu").study == "scaling"
    args = parse("--device", "cpu", "scaling", "--models", "b", "--mode", "infer")
    assert (args.study, args.device, args.models, args.mode) == ("scaling", "cpu", "b", "infer")
    args = parse("pareto", "--runs", "r1", "r2", "--repeats", "3")
    assert (args.study, args.runs, args.repeats, args.device) == ("pareto", ["r1", "r2"], 3, "auto")
    args = parse("edge", "--resolutions", "8,16", "--model-opt", "scaffold=window")
    assert (args.study, args.resolutions, args.model_opt) == ("edge", [8, 16], ["scaffold=window"])
    for argv, complaint in [
        (("pareto",), "--runs"),  # required
        (("pareto", "--runs", "r", "--models", "x"), "unrecognized arguments: --models"),  # not pareto's
        (("edge", "--runs", "r"), "unrecognized arguments: --runs"),
    ]:
        with pytest.raises(SystemExit):
            parse(*argv)
        assert complaint in capsys.readouterr().err


# -- pareto ------------------------------------------------------------------------------------
def test_pareto_front_and_exponent():
    points = [(1.0, 50.0), (2.0, 40.0), (3.0, 60.0), (0.5, 30.0), (3.0, 55.0)]
    assert plots.pareto_front(points) == [3, 0, 2]
    assert plots.scaling_exponent([1, 2, 4, 8], [3 * x**2 for x in (1, 2, 4, 8)]) == pytest.approx(2.0)


def test_pareto_end_to_end(tmp_path, capsys):
    runs = []
    for name, acc in (("dense", 61.5), ("sparse", 60.0)):
        model = afmp.create_model("afmp_tiny_dense" if name == "dense" else "afmp_tiny", num_classes=10)
        save_checkpoint(model, tmp_path / name)
        write_json(tmp_path / name / "results.json", {"test_accuracy": acc})
        runs.append(str(tmp_path / name))
    out = tmp_path / "pareto"
    argv = ["bench", "pareto", "--runs", *runs, "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    assert afmp_cli.main([*argv, "--out", str(out)]) == 0
    with open(out / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], float(r["accuracy"])) for r in rows] == [("dense", 61.5), ("sparse", 60.0)]
    params = sum(p.numel() for p in afmp.create_model("afmp_tiny", num_classes=10).parameters())
    for r in rows:
        assert (r["resolution"], r["tokens"], int(r["params"])) == ("32", "16", params)
        assert float(r["ms_b1"]) > 0 and float(r["ms_b64"]) > 0 and float(r["matmul_gflops"]) > 0
    # Pruning gates edges, it removes no matmul: dense and sparse cost the same matmul flops.
    assert float(rows[0]["matmul_gflops"]) == pytest.approx(float(rows[1]["matmul_gflops"]))
    assert (out / "pareto.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="results.json"):
        cli.pareto.read_accuracy(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"test_accuracy": None}))  # an afmp tune trial's
    with pytest.raises(ValueError, match="was never tested \\(an afmp tune trial\\?\\)"):
        cli.pareto.read_accuracy(tmp_path)
    # From the command line: one line, exit 2, nothing written.
    bad_out = tmp_path / "never"
    assert afmp_cli.main([*argv[:2], "--runs", str(tmp_path), "--device", "cpu", "--out", str(bad_out)]) == 2
    assert "was never tested" in capsys.readouterr().err and not bad_out.exists()


def test_edge_study_writes_the_stage_bandwidth_per_backend(tmp_path):
    from afmp.bench.edge import edge_stage_bytes

    out = tmp_path / "edge"
    argv = ["bench", "edge", "--device", "cpu", "--resolutions", "48", "--batch-size", "2", "--repeats", "1"]
    assert afmp_cli.main([*argv, "--out", str(out)]) == 0
    with open(out / "edge.csv") as f:
        rows = list(csv.DictReader(f))
    # Every backend that can run here: reference, packed, gather, stencil, and triton where its
    # interpreter is on.
    backends = [r["backend"] for r in rows]
    assert backends[:4] == ["reference", "packed", "gather", "stencil"] and len(backends) == len(
        set(backends)
    )
    for row in rows:
        assert (row["grid"], row["tokens"], row["resolution"]) == ("3x3", "9", "48")
        expected = edge_stage_bytes(2, 9, int(row["max_degree"]), 512, 64, 64, 4)
        assert int(row["bytes"]) == expected and float(row["fwd_bwd_ms"]) > 0
        assert float(row["gb_per_s"]) == pytest.approx(expected / float(row["fwd_bwd_ms"]) * 1e-6, rel=1e-6)
    assert {(r["layout"], r["max_degree"]) for r in rows} == {("delaunay", "6")}


def test_edge_study_takes_the_scaffold_from_model_options(tmp_path):
    out = tmp_path / "edge"
    argv = ["bench", "edge", "--device", "cpu", "--resolutions", "48", "--batch-size", "1", "--repeats", "1"]
    opts = ["--model-opt", "scaffold=delaunay_qhull"]  # 8 masked offsets where delaunay has 6
    opts += ["--model-opt", "d_model=64", "--model-opt", "patch_size=8"]  # the shape, not AFMP-Small's
    assert afmp_cli.main([*argv, *opts, "--out", str(out)]) == 0
    with open(out / "edge.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {(r["layout"], r["max_degree"]) for r in rows} == {("delaunay_qhull", "8")}
    assert {(r["grid"], r["d_model"]) for r in rows} == {("6x6", "64")}  # 48 / 8 = 6 tokens a side


def test_bench_records_threads_and_load_and_warns_when_the_machine_is_busy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    out = tmp_path / "bench"
    argv = ["bench", "--models", "afmp_tiny", "--resolutions", "32", "--batch-size", "1", "--repeats", "1"]
    assert afmp_cli.main([*argv, "--warmup", "0", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "threads: 1 of 2 CPUs, load average 7.5" in printed
    assert "warning: the load average (7.5) says other work is running" in printed
    machine = json.loads((out / "bench_config.json").read_text())["machine"]
    assert machine == {"threads": 1, "cpus": 2, "load_1min": 7.5}
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert afmp_cli.main([*argv, "--warmup", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_compiled_model_is_timed_and_its_kernels_bytes_recorded(monkeypatch):
    """The compiled path of a bench row, with torch.compile and inductor's byte count stood
    in for (compiling for real takes a minute here): the row is timed, not skipped. A
    variable of the preparation's log once shadowed the count, and every compiled row was
    skipped with a TypeError."""
    import contextlib
    from types import SimpleNamespace

    compiled = []

    def fake_compile(module, **kw):
        compiled.append(kw)
        return module

    @contextlib.contextmanager
    def fake_bytes():
        counted = SimpleNamespace(bytes=0)
        yield counted
        counted.bytes = 2.5e9

    monkeypatch.setattr(scaling.torch, "compile", fake_compile)
    monkeypatch.setattr(scaling, "compiled_bytes", fake_bytes)
    cfg = _config(models=["afmp_tiny@compile=true"], repeats=2, warmup=1)
    (row,) = scaling.run_scaling(cfg, roofline.load_or_calibrate(torch.device("cpu"), torch.float32))
    assert compiled == [{"dynamic": False}]
    assert (row["note"], row["compile"], row["compiled_gbytes"], row["repeats"]) == ("", True, 2.5, 2)
    assert row["ms_median"] > 0


def test_a_point_set_model_is_benched_at_its_points_per_set():
    from afmp.bench import scaling

    spec = scaling.parse_spec("afmp_points")
    assert scaling.size_field("afmp_points") == scaling.POINTS
    bm = scaling.build(spec, 20, 10, {}, torch.device("cpu"))
    assert bm.tokens == 20 and bm.returns_aux
    cfg = scaling.BenchConfig(models=["afmp_points"], resolutions=[20], precision="cast", dtype="bfloat16")
    x = scaling.make_input(bm, 3, cfg)
    assert x["features"].shape == (3, 20, 3) and x["features"].dtype == torch.bfloat16
    assert x["neighbors"].dtype == torch.long and x["valid"].dtype == torch.bool  # only floats are cast


def test_the_cpu_bench_keeps_freed_memory_unless_asked_for_the_system_allocator(
    tmp_path, monkeypatch, capsys
):
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(timing.ctypes, "CDLL", lambda name: Libc() if name == "libc.so.6" else None)
    out = tmp_path / "bench"
    argv = ["bench", "--models", "afmp_tiny", "--resolutions", "32", "--batch-size", "1", "--repeats", "1"]
    argv += ["--warmup", "0", "--device", "cpu", "--out", str(out)]
    assert afmp_cli.main(argv) == 0
    # glibc's M_MMAP_MAX (-4) to 0 and M_TRIM_THRESHOLD (-1) to 2**31 - 1, as malloc.h numbers them
    assert calls == [(-4, 0), (-1, 2**31 - 1)]
    assert "allocator: freed memory kept (mallopt)" in capsys.readouterr().out
    assert (
        json.loads((out / "bench_config.json").read_text())["cpu_allocator"] == "freed memory kept (mallopt)"
    )
    calls.clear()
    assert afmp_cli.main([*argv, "--system-allocator"]) == 0
    assert calls == [] and "allocator: system (glibc's defaults)" in capsys.readouterr().out


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(timing.ctypes, "CDLL", no_glibc)
    assert timing.keep_freed_memory() is False
    assert cli.cpu_allocator(False) == "system (not glibc)"
