"""The half-precision GEMM paths of ``add_block_circular_conv`` (the DFT as GEMMs; the dense delta matrix) against a
float64 dense reference.

Tolerances, from the arithmetic (normwise, ‖err‖_F ≤ tol·‖ref‖_F). The path is a chain of GEMMs with operands
rounded to the half format (unit roundoff u: bf16 2^-8, fp16 2^-11) and fp32 accumulation. Each rounding of a
tensor is a relative perturbation ≤ u of it, in norm; it reaches the result through the rest of the chain, a
linear map that changes norms by at most κ: the transforms are R/b and 2R, scaled copies of R, orthogonal up to
the DC/Nyquist rows (κ ≤ √2; fp16 stores R/√b, all normal numbers, and applies the rest as the GEMMs' alpha in
fp32), and for the i.i.d. Gaussian data used here a random (k×q) block changes the norm of a product by at
most 1 + √(k/q) ≤ 2 (square blocks, Marchenko–Pastur edge). Roundings counted:
  forward  6: R (twice), the input spectrum, the mixing blocks, the mixed spectrum, the output;
  grad x   6: the same chain run backwards from the (rounded) output gradient;
  grad k   6: R and the spectrum for each of x and the output gradient, and the GEMM output, which on CPU is
              rounded to bf16 before widening to fp32 (fp16's is formed in fp32) — the cross blocks' twice: their
              first product is rounded before the GEMM epilogue adds the second.
So tol = count·2√2·u, plus the fp32 accumulation, L·2^-24 for a reduction of length L ≤ max(b, tokens, n·b)
(≤ 2^-14 here, kept for honesty). This is first-order and worst-case in each stage: measured errors are about
1·u (independent roundings partly cancel), so the tests have room across BLAS libraries and CPUs yet fail for
any real mistake (a wrong sign, slot or scale gives errors of order 1).

The dense path rounds fewer things: the delta matrix's entries (copies of the kernel's) and each GEMM's output
(forward 2, grad x 2); the kernel gradient is the weight gradient, rounded once, summed along the circulant
diagonals in fp32 — b independent roundings per entry, so ≈ u·‖Gw‖ for random data, where ‖proj Gw‖ ≈ ‖Gw‖. The
DFT path's counts bound it.
"""

import math

import pytest
import torch

from c3a.functional import add_block_circular_conv, block_circular_conv, circulant_matrix, dft_max_block
from conftest import UNIT_ROUNDOFF, dense_reference, half_tol, rel_err, saved_activations

NODES = {"dft": "_DftBlockCircularConvBackward", "dense": "_DenseBlockCircularConvBackward",
         "fft": "_BlockCircularConvBackward"}


def _graph_nodes(t):
    """Names of the autograd nodes behind ``t`` (which path ran)."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def _run(result, x, kernels, grad, **kw):
    x = x.detach().requires_grad_()
    ks = [k.detach().requires_grad_() for k in kernels]
    y = add_block_circular_conv(result, x, ks, **kw)
    y.backward(grad)
    return y, x.grad, [k.grad for k in ks]


# (m, n, b): m ≠ n both ways, b from 2 (DC and Nyquist only) to 64, non-powers of two
SHAPES = [(2, 3, 8), (3, 2, 4), (1, 1, 2), (2, 2, 16), (1, 2, 6), (2, 1, 64)]


@pytest.mark.parametrize("path", ["dft", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", [(12,), (2, 5)])
def test_gemm_paths_match_dense_reference(path, dtype, shape, lead):
    m, n, b = shape
    g = torch.Generator().manual_seed(hash((shape, lead)) % 2**31)
    kernel = torch.randn(m, n, b, generator=g)  # kernels stay fp32 (the layer's Parameters)
    x = torch.randn(*lead, n * b, generator=g).to(dtype)
    result = torch.zeros(*lead, m * b, dtype=dtype)  # zero: the error of the delta alone
    grad = torch.randn(*lead, m * b, generator=g).to(dtype)
    y, gx, (gk,) = _run(result, x, [kernel], grad, path=path)
    assert NODES[path] in _graph_nodes(y)
    assert y.dtype == dtype and gx.dtype == dtype and gk.dtype == torch.float32 and y.shape == (*lead, m * b)
    ref, ref_gx, (ref_gk,) = dense_reference(result, x, [kernel], grad)
    tokens = math.prod(lead)
    assert rel_err(y, ref) <= half_tol(dtype, "forward", n * b)
    assert rel_err(gx, ref_gx) <= half_tol(dtype, "grad_x", m * b)
    assert rel_err(gk, ref_gk) <= half_tol(dtype, "grad_k", max(b, tokens))


# Every b up to the largest the dispatch sends to the DFT path (1024, CUDA; forced here on CPU), m ≠ n where cheap.
LARGE_SHAPES = [(3, 2, 2), (2, 3, 64), (2, 1, 256), (1, 1, 1024)]


@pytest.mark.parametrize("path", ["dft", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: f"b{s[2]}")
def test_large_coherent_inputs_stay_finite_and_accurate(path, dtype, shape):
    """Inputs and output gradients of one sign near 4.8e4 (fp16's largest number is 65504): a block's DC is then
    b times its entries, the largest a spectrum gets. Transforms R/√b both ways made it √b·4.8e4 > 65504 for every
    b ≥ 2 (NaN outputs in fp16); the path must keep every intermediate within the data's size.

    The kernel is positive, so nothing cancels in the dominant (DC) sums and the error analysis above holds as for
    Gaussian data, and it is scaled to ‖ΔW‖_∞ = ‖ΔWᵀ‖_∞ ≤ 1/2, so the delta, the input gradient and every partial
    sum fit fp16 with room: whatever overflows is the path's doing. The kernel gradient (≈ tokens·b·4.8e4², far
    beyond fp16) is fp32, as the layer's kernels are.
    """
    m, n, b = shape
    g = torch.Generator().manual_seed(b)
    big, tokens = 4.8e4, 6

    def coherent(d):  # big·(1 ± 5%): entries ≤ 5.04e4
        return (big * (1 + 0.05 * (2 * torch.rand(tokens, d, generator=g) - 1))).to(dtype)

    x, grad = coherent(n * b), coherent(m * b)
    kernel = torch.rand(m, n, b, generator=g)
    dense = circulant_matrix(kernel.double())
    kernel = kernel * (0.5 / max(dense.sum(1).max(), dense.sum(0).max())).item()
    result = torch.zeros(tokens, m * b, dtype=dtype)  # zero: the error of the delta alone
    y, gx, (gk,) = _run(result, x, [kernel], grad, path=path)
    assert NODES[path] in _graph_nodes(y)
    assert y.isfinite().all() and gx.isfinite().all() and gk.isfinite().all()
    ref, ref_gx, (ref_gk,) = dense_reference(result, x, [kernel], grad)
    assert ref.abs().max() < 2.6e4 and ref_gx.abs().max() < 2.6e4  # as designed: the results fit fp16
    assert rel_err(y, ref) <= half_tol(dtype, "forward", n * b)
    assert rel_err(gx, ref_gx) <= half_tol(dtype, "grad_x", m * b)
    assert rel_err(gk, ref_gk) <= half_tol(dtype, "grad_k", max(b, tokens))


@pytest.mark.parametrize("width, block_sizes, paths", [
    (24, (8, 4, 8, 3), {"dense"}),  # narrow: the dense path, odd b included
    (960, (64, 32, 64, 15), {"dft", "fft"}),  # wider: the DFT path, and the FFT for odd b
])
def test_several_kernels_mixed_block_sizes_and_fallbacks(width, block_sizes, paths):
    """Two adapters with the same b (summed into one) and two others, each block size by its own path."""
    torch.manual_seed(0)
    d_in, d_out = width, 2 * width if width < 64 else width
    kernels = [torch.randn(d_out // b, d_in // b, b) / d_in**0.5 for b in block_sizes]
    x = torch.randn(10, d_in).bfloat16()
    result = torch.randn(10, d_out).bfloat16()
    grad = torch.randn(10, d_out).bfloat16()
    y, gx, gks = _run(result, x, kernels, grad)
    assert {path for path, node in NODES.items() if node in _graph_nodes(y)} == paths
    ref, ref_gx, ref_gks = dense_reference(result, x, kernels, grad)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    # result is not zero: the output's own rounding (≤ u·‖ref‖) comes on top of the delta's error
    assert rel_err(y, ref) <= half_tol(torch.bfloat16, "forward", d_in) + u
    assert rel_err(gx, ref_gx) <= half_tol(torch.bfloat16, "grad_x", d_out)
    for gk, ref_gk in zip(gks, ref_gks):
        assert rel_err(gk, ref_gk) <= half_tol(torch.bfloat16, "grad_k", 10)


@pytest.mark.parametrize("path", ["dft", "dense"])
def test_autocast_with_fp32_input_and_weights(path):
    """Inside autocast(bf16) the frozen layer returns bf16 from fp32 x: the DFT path runs in bf16, x's gradient
    stays fp32, and nothing inside is re-cast by autocast."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16, bias=False).requires_grad_(False)
    kernel, x = torch.randn(2, 4, 8), torch.randn(3, 4, 32)
    grad = torch.randn(3, 4, 16).bfloat16()
    xr, kr = x.clone().requires_grad_(), kernel.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = base(x)  # x without grad here, so that xr.grad is the adapter's alone
        y = add_block_circular_conv(result, xr, [kr], path=path)
    assert result.dtype == y.dtype == torch.bfloat16 and NODES[path] in _graph_nodes(y)
    y.backward(grad)
    assert xr.grad.dtype == torch.float32 and kr.grad.dtype == torch.float32
    # the path sees x rounded to bf16; the reference uses the same rounded input
    ref, ref_gx, (ref_gk,) = dense_reference(torch.zeros(3, 4, 16), x.bfloat16(), [kernel], grad)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert rel_err(y.double() - result.double(), ref) <= half_tol(torch.bfloat16, "forward", 32) + 2 * u * (
        y.double().norm() / ref.norm()  # y's rounding, relative to the delta's size
    )
    assert rel_err(xr.grad, ref_gx) <= half_tol(torch.bfloat16, "grad_x", 16)
    assert rel_err(kr.grad, ref_gk) <= half_tol(torch.bfloat16, "grad_k", 12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_delta_rounds_once(dtype):
    """exact_delta: the delta in fp32 and added before the one rounding, so the output is the correctly rounded
    ``result + delta`` up to fp32 error; the default mode rounds the spectra too (larger error, same order u)."""
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 16) * 0.05
    x = torch.randn(64, 32).to(dtype)
    result = torch.randn(64, 48).to(dtype)
    exact_sum = result.double() + x.double() @ circulant_matrix(kernel.double()).T
    u = UNIT_ROUNDOFF[dtype]
    y_exact = add_block_circular_conv(result, x, [kernel], exact_delta=True)
    assert y_exact.dtype == dtype
    # one rounding: |y - s| ≤ u·|s| per element, up to the fp32 computation of the delta (2^-24 · n·b terms)
    slack = 64 * 2.0**-24 * (x.double().abs() @ circulant_matrix(kernel.double()).abs().T)
    assert ((y_exact.double() - exact_sum).abs() <= u * exact_sum.abs() + slack).all()
    y_fast = add_block_circular_conv(result, x, [kernel])
    assert rel_err(y_fast, exact_sum) <= half_tol(dtype, "forward", 32) + u
    assert rel_err(y_exact, exact_sum) <= rel_err(y_fast, exact_sum)


@pytest.mark.parametrize("path", ["fft", "dense"])
def test_exact_delta_on_odd_block_sizes(path):
    torch.manual_seed(0)
    kernel = torch.randn(2, 2, 5) * 0.05  # odd b: the FFT path, or the dense one
    x, result = torch.randn(7, 10).bfloat16(), torch.randn(7, 10).bfloat16()
    exact_sum = result.double() + x.double() @ circulant_matrix(kernel.double()).T
    y = add_block_circular_conv(result, x, [kernel], exact_delta=True, path=path)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - exact_sum).abs() <= 2.0**-8 * exact_sum.abs() + 1e-6).all()


@pytest.mark.parametrize("path", ["dft", "dense"])
@pytest.mark.parametrize("shape", [(2, 3, 8), (3, 2, 4), (1, 1, 2), (2, 1, 6)])
def test_gemm_construction_gradcheck_float64(path, shape):
    """The very same GEMM construction run in float64: exact forward and gradients for result, x and kernel."""
    m, n, b = shape
    torch.manual_seed(1)
    kernel = torch.randn(m, n, b, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, n * b, dtype=torch.float64, requires_grad=True)
    result = torch.randn(2, 3, m * b, dtype=torch.float64, requires_grad=True)

    def gemm(result, x, kernel):
        return add_block_circular_conv(result, x, [kernel], path=path)

    torch.testing.assert_close(gemm(result, x, kernel), result + block_circular_conv(x, kernel), rtol=1e-12, atol=1e-12)
    assert NODES[path] in _graph_nodes(gemm(result, x, kernel))
    assert torch.autograd.gradcheck(gemm, (result, x, kernel))


def test_dispatch():
    """Full precision: FFT (the layer folds before calling). Half precision, by shape: narrow layers (where the dense
    GEMMs beat the DFT path's small ones) dense, whatever b; wider ones the DFT path for even b up to its limit, else
    the FFT path."""

    def path_of(dtype, d_in, d_out, b, autocast=False):
        x = torch.randn(3, d_in).to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            names = _graph_nodes(add_block_circular_conv(torch.zeros(3, d_out, dtype=dtype), x, [torch.randn(d_out // b, d_in // b, b)]))
        return next(path for path, node in NODES.items() if node in names)

    assert path_of(torch.float32, 16, 16, 8) == path_of(torch.float64, 16, 16, 8) == "fft"
    for dtype in (torch.bfloat16, torch.float16):
        assert path_of(dtype, 16, 16, 8) == path_of(dtype, 15, 10, 5) == "dense"  # narrow: any b
        assert path_of(dtype, 576, 192, 48) == "dense"  # SmolLM2's v_proj
        assert path_of(dtype, 576, 576, 48) == path_of(dtype, 1024, 1024, 64) == "dft"
        assert path_of(dtype, 1029, 1029, 49) == "fft"  # odd b, wide
        assert path_of(dtype, 4096, 1024, 512) == "fft"  # beyond where the b×b GEMM pays, not narrow
    assert path_of(torch.float32, 576, 576, 48, autocast=True) == "dft"  # fp32 tensors under autocast: half
    assert path_of(torch.float32, 16, 16, 8, autocast=True) == "dense"


def test_dft_threshold_is_per_device_type():
    """The GEMM path's limit was measured per device: larger on CUDA (an H200) than on the CPU; a device type
    never measured gets the CPU's, the conservative one."""
    assert dft_max_block("cpu") == dft_max_block(torch.device("cpu")) == 256
    assert dft_max_block(torch.device("cuda", 0)) == 1024
    assert dft_max_block("meta") == dft_max_block("cpu")


@pytest.mark.parametrize("view", [False, True])
def test_inplace_accumulates_into_result_with_the_same_gradients(view):
    """inplace=True (the layer's call): the delta lands in the frozen output's own storage (also when that output
    is a view, as Conv1D's is) and every gradient equals the copying call's; the default leaves ``result`` alone."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48, bias=False).bfloat16().requires_grad_(False)
    kernels = [torch.randn(6, 4, 8), torch.randn(12, 8, 4)]  # two DFT calls: the second accumulates again
    x0, grad = torch.randn(5, 32).bfloat16(), torch.randn(5, 48).bfloat16()
    runs = []
    for inplace in (False, True):
        x = x0.clone().requires_grad_()
        ks = [k.clone().requires_grad_() for k in kernels]
        result = base(x).view(5, 6, 8).view(5, 48) if view else base(x)
        before = result.detach().clone()
        y = add_block_circular_conv(result, x, ks, inplace=inplace)
        assert (y.data_ptr() == result.data_ptr()) == inplace
        assert torch.equal(result.detach(), y.detach() if inplace else before)
        y.backward(grad)
        runs.append((y.detach(), x.grad, [k.grad for k in ks]))
    (y0, gx0, gk0), (y1, gx1, gk1) = runs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gk0, gk1))


@pytest.mark.parametrize("path", ["dft", "dense"])
@pytest.mark.parametrize("inplace", [False, True])
def test_inference_runs_without_an_autograd_node_and_equals_the_training_call(path, inplace):
    """Under ``no_grad`` the DFT path is a plain function (nothing saved, no node, what torch.compile traces in
    inference); its output is bit-identical to the differentiable call's, in place or not."""
    torch.manual_seed(0)
    kernel, x = torch.randn(6, 4, 8), torch.randn(5, 32).bfloat16()
    result = torch.randn(5, 48).bfloat16()
    with_grad = add_block_circular_conv(result.clone(), x, [kernel.requires_grad_()], inplace=inplace, path=path)
    assert NODES[path] in _graph_nodes(with_grad)
    target = result.clone()
    with torch.no_grad():
        plain = add_block_circular_conv(target, x, [kernel], inplace=inplace, path=path)
    assert plain.grad_fn is None and torch.equal(plain, with_grad.detach())
    assert (plain.data_ptr() == target.data_ptr()) == inplace and torch.equal(target, plain if inplace else result)


def test_saves_only_the_input():
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    kernel = torch.randn(2, 4, 8, requires_grad=True)
    result = torch.zeros(64, 16, dtype=torch.bfloat16)
    activations = saved_activations(lambda: add_block_circular_conv(result, x, [kernel]), x)
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()  # x itself: no spectrum, no copy


def test_errors_and_no_kernels():
    x, result = torch.randn(2, 10).bfloat16(), torch.zeros(2, 10).bfloat16()
    with pytest.raises(ValueError, match="even block size"):
        add_block_circular_conv(result, x, [torch.randn(2, 2, 5)], path="dft")
    with pytest.raises(ValueError, match="path"):
        add_block_circular_conv(result, x, [torch.randn(2, 2, 5)], path="gemm")
    with pytest.raises(ValueError, match="n·b"):
        add_block_circular_conv(result, x, [torch.randn(2, 3, 4)])
    assert add_block_circular_conv(result, x, []) is result
