"""Fused Triton ops are credited with their references' flops (afmp.measure.counting's last
section): a step through the kernels counts exactly the flops of the same step through
the plain-PyTorch reference, and fewer bytes. The kernels run under TRITON_INTERPRET=1
on the CPU (conftest), so shapes are tiny."""

from functools import partial

import pytest
import torch

from afmp.bench import scaling
from afmp.measure import counting
from afmp.ops.linear_attention import linear_attention

pytest.importorskip("afmp.ops.triton_edge")
EDGE_OPS = {"afmp.edge_scores", "afmp.gated_aggregate"}
EDGE_BACKWARD_OPS = {"afmp.edge_scores_backward", "afmp.gated_aggregate_backward"}


pytestmark = pytest.mark.usefixtures("one_thread")


def afmp_step_costs(backend: str, mode: str, dtype: str) -> counting.Costs:
    """What ``afmp bench`` counts for afmp_tiny (4 layers: the first without prediction)."""
    cfg = scaling.BenchConfig(
        models=["afmp_tiny"], resolutions=[16], batch_size=4, mode=mode, dtype=dtype, device="cpu"
    )
    spec = scaling.parse_spec(f"afmp_tiny@backend={backend}@patch_size=4")
    torch.manual_seed(0)
    bm = scaling.build(spec, 16, 10, {}, torch.device("cpu"))
    bm.module.train(mode == "train")
    step = scaling.make_step(bm, bm.module, cfg, torch.device("cpu"))
    return counting.count_step(lambda b: partial(step, scaling.make_input(bm, b, cfg)), cfg.batch_size)


# bfloat16 is afmp bench's autocast, as on a GPU: its casts count no flops on either side.
@pytest.mark.parametrize(
    ("mode", "dtype"), [("train", "float32"), ("infer", "float32"), ("train", "bfloat16")]
)
def test_afmp_counts_the_same_flops_with_the_triton_kernels_and_fewer_bytes(mode, dtype):
    reference, fused = afmp_step_costs("reference", mode, dtype), afmp_step_costs("triton", mode, dtype)
    assert set(fused.by_op) >= (EDGE_OPS | EDGE_BACKWARD_OPS if mode == "train" else EDGE_OPS)
    assert not set(reference.by_op) & (EDGE_OPS | EDGE_BACKWARD_OPS)
    assert fused.matmul_flops == reference.matmul_flops > 0
    assert fused.total_flops == reference.total_flops > fused.matmul_flops
    assert fused.bytes < reference.bytes / 2  # no (B, N, K, D) tensor goes through memory


def linear_attention_step_costs(backend: str) -> counting.Costs:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).requires_grad_() for n in (9, 7, 7))
    return counting.count(lambda: linear_attention(q, k, v, backend=backend).square().sum().backward())


def test_linear_attention_counts_the_same_flops_with_the_triton_kernel_and_fewer_bytes():
    reference, fused = linear_attention_step_costs("reference"), linear_attention_step_costs("triton")
    assert {"afmp.linear_attention_fwd", "afmp.linear_attention_bwd"} <= set(fused.by_op)
    # The state phi(k)^T v and phi(q) S are matmuls in the reference: the kernel's stay matmuls.
    assert fused.matmul_flops == reference.matmul_flops > 0
    assert fused.total_flops == reference.total_flops > fused.matmul_flops
    assert fused.bytes < reference.bytes


def test_reference_costs_of_a_forward_and_its_backward_match_counting_them_directly():
    def bilinear(x, w):
        return (x @ w).relu().sum(-1)

    x, w, grad = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3)
    direct = counting.count(lambda: bilinear(x, w))  # mm 2*3*4*5, relu 15, sum over 15 elements
    forward = counting.reference_costs(bilinear, (x, w))
    assert (
        (forward.matmul_flops, forward.total_flops)
        == (direct.matmul_flops, direct.total_flops)
        == (120, 120 + 15 + 15)
    )
    x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = bilinear(x_, w_)
    direct = counting.count(lambda: torch.autograd.grad(out, (w_,), grad))
    backward = counting.reference_costs(bilinear, (x, w), (grad,), wrt=(1,))  # only w's gradient: one matmul
    assert (backward.matmul_flops, backward.total_flops) == (direct.matmul_flops, direct.total_flops)
    assert backward.matmul_flops == 2 * 3 * 4 * 5
