import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from c3a.functional import (
    add_block_circular_conv,
    add_block_circular_conv_rows,
    block_circulant_linear,
    block_circular_conv,
    circulant_matrix,
)
from conftest import saved_activations

SHAPES = [(1, 1, 1), (1, 1, 7), (2, 3, 5), (3, 2, 4), (4, 4, 8), (1, 3, 6), (2, 1, 9), (3, 5, 1), (2, 2, 16)]


def _naive_circulant(kernel):
    """Straight from the definition: block (i, j), row r is kernel[i, j] rolled right by r."""
    m, n, b = kernel.shape
    out = torch.zeros(m * b, n * b, dtype=kernel.dtype)
    for i in range(m):
        for j in range(n):
            for r in range(b):
                out[i * b + r, j * b : (j + 1) * b] = torch.roll(kernel[i, j], r)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_circulant_matrix_convention(shape):
    k = torch.randn(*shape, dtype=torch.float64)
    dense = circulant_matrix(k)
    assert torch.equal(dense, _naive_circulant(k))
    m, n, b = shape
    assert torch.equal(dense[0, :b], k[0, 0])  # first row of block (0, 0) is the kernel itself


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_forward_and_gradients_match_dense(shape, lead):
    m, n, b = shape
    torch.manual_seed(0)
    k = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*lead, n * b, dtype=torch.float64, requires_grad=True)
    y = block_circular_conv(x, k)
    k2, x2 = k.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y2 = x2 @ circulant_matrix(k2).T
    assert y.shape == (*lead, m * b)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck(shape):
    m, n, b = shape
    torch.manual_seed(1)
    k = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, n * b, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block_circular_conv, (x, k))


def test_gradient_for_one_input_only():
    k = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(block_circular_conv(x, k.detach()).sum(), x)
    (gk,) = torch.autograd.grad(block_circular_conv(x.detach(), k).sum(), k)
    dense = circulant_matrix(k.detach())
    torch.testing.assert_close(gx, torch.ones(5, 8, dtype=torch.float64) @ dense)
    torch.testing.assert_close(gk, torch.autograd.grad((x.detach() @ circulant_matrix(k).T).sum(), k)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    torch.manual_seed(0)
    k = torch.randn(2, 3, 8, requires_grad=True)  # kernels stay fp32
    x = torch.randn(4, 24).to(dtype).requires_grad_()
    y = block_circular_conv(x, k)
    assert y.dtype == dtype
    ref = x.detach().float() @ circulant_matrix(k.detach()).T
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and k.grad.dtype == torch.float32
    ref_gk = torch.autograd.grad((x.detach().float() @ circulant_matrix(k).T).sum(), k)[0]
    torch.testing.assert_close(k.grad, ref_gk, rtol=1e-4, atol=1e-4)


def test_saves_only_input_in_its_own_dtype():
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 3, 8, requires_grad=True)
    activations = saved_activations(lambda: block_circular_conv(x, k), x)
    assert len(activations) == 1 and activations[0].dtype == torch.bfloat16
    assert activations[0].data_ptr() == x.data_ptr()  # the input itself, no copy


def test_shape_errors():
    with pytest.raises(ValueError, match="n·b"):
        block_circular_conv(torch.randn(2, 10), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(m, n, b\)"):
        block_circular_conv(torch.randn(2, 12), torch.randn(3, 4))


def test_double_backward_is_refused_not_wrong():
    k = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(block_circular_conv(x, k).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad and does not have a grad_fn"):
        gx.sum().backward()  # the first backward left no graph behind (once_differentiable): nothing to get wrong


def test_peft_reference_input_gradient_is_wrong():
    """PEFT's BlockCircularConvolution returns C·g as the input gradient instead of Cᵀ·g; ours is exact.

    If this test fails because PEFT's gradient became right, PEFT has fixed the bug: update the README.
    """
    utils = pytest.importorskip("peft.tuners.c3a.utils")
    torch.manual_seed(0)
    k = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    peft_op = utils.BlockCircularConvolution.apply
    torch.testing.assert_close(peft_op(x, k), block_circular_conv(x, k))  # same forward, same convention
    with pytest.raises(GradcheckError, match="Jacobian mismatch for output 0 with respect to input 0"):
        torch.autograd.gradcheck(peft_op, (x, k.detach()))
    assert torch.autograd.gradcheck(block_circular_conv, (x, k.detach()))
    g = torch.randn(3, 8, dtype=torch.float64)  # not all-ones: circulant row and column sums coincide
    (g_peft,) = torch.autograd.grad(peft_op(x, k), x, g)
    (g_ours,) = torch.autograd.grad(block_circular_conv(x, k), x, g)
    torch.testing.assert_close(g_ours, g @ circulant_matrix(k.detach()))  # Cᵀ·g, the chain rule
    assert not torch.allclose(g_peft, g_ours)


@pytest.mark.parametrize("shape", [(0, 12), (3, 0, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batches_every_path(shape, dtype):
    """No tokens: empty outputs and input gradients, zero kernel gradients (FFT libraries reject empty transforms)."""
    kernel = torch.randn(2, 3, 4, requires_grad=True)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    calls = [lambda: block_circular_conv(x, kernel),
             lambda: add_block_circular_conv(torch.zeros(*shape[:-1], 8, dtype=dtype), x, [kernel])]
    if dtype == torch.float32:
        calls.append(lambda: block_circulant_linear(x, torch.randn(8, 12), None, [kernel]))
    for call in calls:
        x.grad = kernel.grad = None
        y = call()
        assert y.shape == (*shape[:-1], 8) and y.dtype == dtype
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.count_nonzero(kernel.grad) == 0


def test_meta_inputs():
    kernel = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="input is on meta and the kernel on cpu"):
        block_circular_conv(torch.empty(5, 12, device="meta"), kernel)
    assert block_circular_conv(torch.empty(5, 12, device="meta"), kernel.to("meta")).device.type == "meta"


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 1), (3, 2, 4)])
def test_rows_through_their_own_kernels_in_float64(shape):
    """Many adapters in one call: row r through kernels[index[r]], none for a negative index; float64 exact."""
    m, n, b = shape
    torch.manual_seed(0)
    kernels = torch.randn(3, m, n, b, dtype=torch.float64)
    x = torch.randn(5, 2, n * b, dtype=torch.float64)
    result = torch.randn(5, 2, m * b, dtype=torch.float64)
    index = torch.tensor([2, -1, 0, 1, 2])
    out = add_block_circular_conv_rows(result, x, kernels, index)
    for r, i in enumerate(index.tolist()):
        expected = result[r] + (x[r] @ _naive_circulant(kernels[i]).T if i >= 0 else 0)
        torch.testing.assert_close(out[r], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[1], result[1])


def test_rows_call_rejects_bad_shapes():
    x, result = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"kernels must have shape \(N, m, n, b\)"):
        add_block_circular_conv_rows(result, x, torch.randn(2, 2, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per row of x"):
        add_block_circular_conv_rows(result, x, torch.randn(3, 2, 2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="n·b"):
        add_block_circular_conv_rows(result, x, torch.randn(3, 2, 3, 4), torch.zeros(4, dtype=torch.long))
