"""Non-causal linear attention: the O(N) reference against its N x M form, the Triton kernel
against the reference (forward and gradients; on the CPU through TRITON_INTERPRET=1, set
by conftest), the backend choice, and the custom op's registrations."""

import pytest
import torch

from afmp.ops.linear_attention import (
    feature_map,
    linear_attention,
    linear_attention_quadratic,
    linear_attention_reference,
    select_linear_attention,
)

triton_la = pytest.importorskip("afmp.ops.triton_linear_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_feature_map_literal():
    x = torch.tensor([[1.5, -2.0, 0.0]])
    assert torch.equal(feature_map(x), torch.tensor([[1.5, 0.0, 0.0, 0.0, 2.0, 0.0]]))


def test_linear_form_equals_explicit_kernel_matrix_float64():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 11, 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)  # M != N and Dv != D
    linear = linear_attention_reference(q, k, v)
    explicit = linear_attention_quadratic(q, k, v)
    torch.testing.assert_close(linear, explicit, rtol=1e-12, atol=1e-12)
    # And by hand for one query: sum_j w_j v_j / sum_j w_j with w_j = phi(q)^T phi(k_j).
    w = torch.stack([feature_map(q[0, 0, 3]) @ feature_map(k[0, 0, j]) for j in range(7)])
    torch.testing.assert_close(linear[0, 0, 3], (w[:, None] * v[0, 0]).sum(0) / (w.sum() + 1e-6))


# Odd sizes, N not a multiple of the 64-row block, a head dim padded to the next power of two,
# fewer keys than queries (as RippleAttention has), and strided (non-contiguous) inputs.
SHAPES = [
    # (B, H, N, M, D, strided)
    (1, 2, 100, 100, 16, False),
    (2, 1, 37, 37, 24, True),
    (1, 2, 83, 21, 32, True),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(b, h, n, m, d, strided, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def make(rows):
        if strided:  # (B, N, H, D) memory seen as (B, H, N, D), as split_heads gives it
            x = torch.randn(b, rows, h, d, generator=g).transpose(1, 2)
        else:
            x = torch.randn(b, h, rows, d, generator=g)
        return x.to(DEVICE, dtype).requires_grad_()

    return make(n), make(m), make(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}H{s[1]}N{s[2]}M{s[3]}D{s[4]}" for s in SHAPES])
def test_triton_kernel_matches_reference(shape, dtype):
    q, k, v = _inputs(*shape, dtype, seed=sum(shape[:5]))
    out = triton_la.linear_attention_triton(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    # The reference in float64 on the very same (rounded) inputs.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) < tol
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype
        assert rel_err(got, want) < tol, f"d{name}"


def test_triton_kernel_handles_exact_zeros_like_autograd():
    # relu'(0) = 0 for both halves of phi: a zero query or key entry gets no gradient through phi.
    q, k, v = _inputs(1, 1, 20, 20, 16, False, torch.float32, seed=3)
    with torch.no_grad():
        q[0, 0, :5, :3] = 0.0
        k[0, 0, 2:9, 4] = 0.0
    out = triton_la.linear_attention_triton(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(linear_attention_reference(q2, k2, v2).square().sum(), (q2, k2, v2))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5
    assert bool((grads[0][0, 0, :5, :3] == 0).all())


def test_backend_choice_and_override():
    cpu = torch.device("cpu")
    assert select_linear_attention("auto", cpu) is linear_attention_reference
    assert select_linear_attention("reference", cpu) is linear_attention_reference
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        select_linear_attention("cuda-magic", cpu)
    q, k, v = _inputs(1, 2, 9, 9, 8, False, torch.float32, seed=4)
    torch.testing.assert_close(
        linear_attention(q, k, v, backend="triton"), linear_attention(q, k, v, backend="reference")
    )
    if torch.cuda.is_available():
        assert select_linear_attention("auto", torch.device("cuda")) is not linear_attention_reference


def test_bad_shapes_are_value_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        linear_attention_reference(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="expected q"):
        linear_attention_reference(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="head dim"):
        triton_la.linear_attention_triton(*(torch.randn(1, 1, 4, 160) for _ in range(3)))


def test_custom_op_registrations_pass_opcheck():
    q, k, v = _inputs(1, 2, 19, 19, 16, False, torch.float32, seed=5)
    torch.library.opcheck(
        torch.ops.afmp.linear_attention_fwd.default,
        (q, k, v, 1e-6),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_no_graph_break_under_compile():
    q, k, v = _inputs(1, 2, 19, 19, 16, False, torch.float32, seed=6)

    def f(q, k, v):
        return linear_attention(q, k, v, backend="triton").sum()

    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
