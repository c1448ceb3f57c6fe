"""The tuner layer on its own: both forward paths exact, merge/unmerge, init, dtypes, mixed-adapter batches."""

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft import get_peft_model

from c3a import C3AConfig, C3ALinear, circulant_matrix
from conftest import UNIT_ROUNDOFF, half_tol, rel_err, saved_activations


def _layer(base: nn.Module, *adapters: tuple[str, int]) -> C3ALinear:
    (first, b), *rest = adapters
    layer = C3ALinear(base, first, block_size=b, init_weights="gaussian")
    for name, size in rest:
        layer.update_layer(name, size, "gaussian")
    layer.set_adapter([name for name, _ in adapters])
    return layer


def _dense_weight(layer: C3ALinear, adapters) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight
    return weight + sum(circulant_matrix(layer.c3a_kernel[a].detach()) / layer.in_features for a in adapters)


@pytest.mark.parametrize("base", [nn.Linear(24, 16), Conv1D(16, 24)])  # Conv1D(nf=out, nx=in)
def test_layer_equals_dense_delta_and_merges(base):
    torch.manual_seed(0)
    layer = _layer(copy.deepcopy(base), ("a", 8))
    x = torch.randn(3, 5, 24)
    expected = nn.functional.linear(x, _dense_weight(layer, ["a"]), base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fold_ratio", [0, 10**9])  # FFT path, folded-weight path
@pytest.mark.parametrize("base_cls", ["linear", "conv1d"])
def test_both_layer_paths_exact(monkeypatch, fold_ratio, base_cls):
    monkeypatch.setattr("c3a.layer.FOLD_RATIO", fold_ratio)
    torch.manual_seed(0)
    base = (nn.Linear(12, 8) if base_cls == "linear" else Conv1D(8, 12)).double()
    layer = _layer(base, ("a", 4), ("b", 2))
    layer.double()  # gradcheck needs float64 kernels too
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, _dense_weight(layer, "ab"), base.bias))
    params = (x, layer.c3a_kernel["a"], layer.c3a_kernel["b"], layer.base_layer.bias)
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), params)


@pytest.mark.parametrize("kernel_dtype", [torch.float32, torch.bfloat16])  # get_peft_model's autocast or not
def test_bf16_base_any_kernel_dtype(kernel_dtype):
    layer = _layer(nn.Linear(16, 16).to(torch.bfloat16), ("a", 4))
    assert layer.c3a_kernel["a"].dtype == torch.bfloat16  # PEFT's contract: the base layer's dtype ...
    layer.c3a_kernel["a"] = nn.Parameter(layer.c3a_kernel["a"].to(kernel_dtype))  # ... until autocast makes it fp32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.c3a_kernel["a"].grad.dtype == kernel_dtype
    ref = layer.base_layer(x).float() + x.float() @ (circulant_matrix(layer.c3a_kernel["a"].detach().float()) / 16).T
    # bf16 output: one rounding (2^-8 relative) of values of size ~|ref|, plus the bf16 base GEMM over 16 terms
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("block_size, size", [(256, 5000.0), (64, 2e4)])
def test_fp16_model_with_large_inputs_stays_finite(block_size, size):
    """The issue's example: an fp16 model whose frozen layer handles inputs this large (outputs up to ~3e4, within
    fp16's 65504) gave all-NaN outputs once adapted, the DFT path's spectra overflowing. Now finite, and equal to
    the dense delta added to the frozen fp16 output within the path's normwise bound: the delta's 6 roundings
    (unit roundoff u = 2^-11), each through a chain of norm ≤ 2·‖ΔW‖₂ (transforms R/b and 2R, ‖R‖₂ = √b; the
    mixing blocks' norm is ‖ΔW‖₂, ΔW being unitarily similar to them), plus the output's own rounding."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(256, 256, bias=False)).half(), C3AConfig(block_size=block_size, target_modules=["0"])
    )
    layer = model.get_base_model()[0]
    x = (size * (1 + 0.1 * torch.randn(8, 256))).half().requires_grad_()  # one sign: the spectra's worst case
    with torch.no_grad():
        frozen = layer.base_layer(x)
    y = model(x)
    assert frozen.isfinite().all() and y.isfinite().all()
    delta_w = circulant_matrix(layer.c3a_kernel["default"].detach().double()) / 256
    ref = frozen.double() + x.detach().double() @ delta_w.T
    u = 2.0**-11
    bound = 12 * u * torch.linalg.matrix_norm(delta_w, 2) * x.detach().double().norm() + u * ref.norm()
    assert (y.double() - ref).norm() <= bound
    y.backward(y.detach())  # output gradients as large as the outputs
    assert x.grad.isfinite().all() and layer.c3a_kernel["default"].grad.isfinite().all()


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian", "zeros", True, False])
def test_init_weights(init):
    layer = C3ALinear(nn.Linear(32, 16), "a", block_size=8, init_weights=init)
    k = layer.c3a_kernel["a"]
    assert k.shape == (2, 4, 8) and k.dtype == torch.float32
    if init in ("zeros", True):
        assert torch.count_nonzero(k) == 0
    else:
        assert torch.count_nonzero(k) == k.numel()
    if init in ("xavier_uniform", False):
        assert k.abs().max() <= (6 / 48) ** 0.5


def test_unsupported_layer_type_and_bad_block_size():
    with pytest.raises(TypeError, match="Conv2d"):
        C3ALinear(nn.Conv2d(3, 3, 1), "a", block_size=1)
    with pytest.raises(ValueError, match=r"valid block sizes: \[1, 2, 4, 8, 16\]"):
        C3ALinear(nn.Linear(32, 16), "a", block_size=5)


def test_a_base_whose_forward_is_replaced_runs_it():
    """Hooks that replace ``forward`` on the instance (diffusers' layerwise casting and offloading) must run: the
    delta is not folded into a weight they may keep elsewhere or in a storage dtype."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(64, 64), ("a", 16))
    x = torch.randn(256, 64)  # enough tokens that a plain base folds
    assert layer._fold_into_weight(x)
    base = layer.base_layer
    plain_forward = base.forward
    base.forward = lambda inputs: plain_forward(inputs) + 1  # stands in for what such a hook does
    expected = base(x) + x @ (circulant_matrix(layer.c3a_kernel["a"].detach()) / 64).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_autocast_uses_the_fft_path():
    """Under bf16 autocast the delta is not folded into a weight that autocast would round to bf16."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(256, 256), ("a", 64))
    x = torch.randn(512, 256)  # enough tokens that fp32 folds
    assert layer._fold_into_weight(x)
    expected = layer.base_layer(x) + x @ (circulant_matrix(layer.c3a_kernel["a"].detach()) / 256).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._fold_into_weight(x)
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).norm() < 1e-2 * expected.norm()


@pytest.mark.parametrize("d_out, b", [(256, 64), (64, 16)])  # the DFT path; a narrow layer's dense path
def test_autocast_casts_the_input_once_for_the_base_and_the_delta(d_out, b):
    """Under bf16 autocast an fp32 input is cast once and shared: the frozen output is bit-identical to the bare
    base layer's under autocast, what the layer keeps for backward is that bf16 copy (no fp32 activation), and the
    input gradient — both parts meeting in bf16, converted once — is the float64 reference's within bf16
    roundings (the delta path's bound, plus one rounding of the sum)."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(256, d_out), ("a", b))
    x = torch.randn(64, 256, requires_grad=True)
    grad = torch.randn(64, d_out)
    with torch.no_grad():
        kernel = layer.c3a_kernel["a"].clone()
        layer.c3a_kernel["a"].zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer.base_layer(x))  # a zero delta: exactly the frozen output
        with torch.no_grad():
            layer.c3a_kernel["a"].copy_(kernel)
        saved = [t for t in saved_activations(lambda: layer(x), x) if t.shape == x.shape]  # not the weight's cast
        y = layer(x)
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)
    assert len({t.data_ptr() for t in saved}) == 1
    y.backward(grad.bfloat16())
    assert x.grad.dtype == torch.float32
    base = layer.base_layer
    x16 = x.detach().bfloat16().double().requires_grad_()
    dense = base.weight.detach().bfloat16().double() + circulant_matrix(kernel.double()) / 256
    (x16 @ dense.T).backward(grad.bfloat16().double())
    u = UNIT_ROUNDOFF[torch.bfloat16]
    assert rel_err(x.grad, x16.grad) <= half_tol(torch.bfloat16, "grad_x", d_out) + u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [(8, 8, 8), (8, 4, 8)], ids=["one-b", "two-b"])
def test_mixed_batch_inference_in_one_call_equals_each_row_dense(dtype, sizes):
    """Serving: without a graph, a mixed batch's deltas run in one call over all rows when every adapter present
    has the same block size (else per adapter); each row equals its own adapter's dense layer, base rows are the
    base layer's exactly, and a layer that needs a graph still gets the per-adapter path (same outputs)."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(48, 24).to(dtype), *zip(("a", "b", "c"), sizes))
    x = torch.randn(6, 3, 48).to(dtype)
    names = ["c", "__base__", "a", "b", "a", "c"]
    calls = []
    real = C3ALinear._serves_in_one_call
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C3ALinear, "_serves_in_one_call", lambda self, *a: calls.append(real(self, *a)) or calls[-1])
        with torch.no_grad():
            served = layer(x, adapter_names=names)
        trained = layer(x, adapter_names=names)  # kernels require grad: the per-adapter path
    assert calls == [len(set(sizes)) == 1, False]
    u = torch.finfo(dtype).eps / 2
    for row, name in enumerate(names):
        weight = _dense_weight(layer, [] if name == "__base__" else [name]).double()
        expected = x[row].double() @ weight.T + layer.base_layer.bias.double()
        # normwise: three roundings to the output's format (the frozen output, the delta, their sum), plus the fp32
        # FFT path's stages, each a reduction of length ≤ d_in = 48 (tests/test_compile.py derives 4·L·2^-24)
        assert rel_err(served[row], expected) <= 3 * u + 4 * 48 * 2.0**-24, name
    assert torch.equal(served[1], layer.base_layer(x)[1])  # a base row: nothing added (same GEMM: no batch-size rounding)
    torch.testing.assert_close(served, trained.detach(), rtol=4 * u, atol=4 * u * served.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the DFT path, in place on row copies
def test_mixed_batch_rows_equal_each_adapter_alone(dtype):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 8).to(dtype), ("a", 4), ("b", 8))
    x = torch.randn(5, 3, 16).to(dtype)
    names = ["a", "__base__", "b", "a", "b"]
    mixed = layer(x, adapter_names=names)
    mixed.float().square().sum().backward()  # both adapters' kernels get gradients from their rows alone
    grads = {a: layer.c3a_kernel[a].grad.clone() for a in ("a", "b")}
    alone, alone_grads = {}, {}
    for adapter in ("a", "b"):
        layer.set_adapter(adapter)
        layer.c3a_kernel[adapter].grad = None
        out = layer(x)
        rows = [i for i, n in enumerate(names) if n == adapter]
        out[rows].float().square().sum().backward()
        alone[adapter], alone_grads[adapter] = out.detach(), layer.c3a_kernel[adapter].grad
    alone["__base__"] = layer.base_layer(x)
    # each row is the same arithmetic on a smaller batch; GEMM blocking may round differently: a few unit roundoffs
    u = torch.finfo(dtype).eps / 2
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row].detach(), alone[name][row], rtol=16 * u, atol=16 * u)
    for adapter in ("a", "b"):
        scale = grads[adapter].abs().max().item()
        torch.testing.assert_close(grads[adapter], alone_grads[adapter], rtol=16 * u, atol=16 * u * scale)
    with pytest.raises(ValueError, match="2 entries for a batch of 5"):
        layer(x, adapter_names=["a", "b"])


def test_merge_refuses_non_finite_and_leaves_base_untouched():
    layer = _layer(nn.Linear(8, 8), ("a", 4))
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.c3a_kernel["a"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter a seems to be broken"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


@pytest.mark.parametrize("fold_ratio", [0, 10**9])  # FFT path, folded-weight path
@pytest.mark.parametrize("base_cls", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)])
def test_empty_batch_like_nn_linear(monkeypatch, fold_ratio, base_cls, shape):
    monkeypatch.setattr("c3a.layer.FOLD_RATIO", fold_ratio)
    base = nn.Linear(12, 8) if base_cls == "linear" else Conv1D(8, 12)
    layer = _layer(copy.deepcopy(base), ("a", 4), ("b", 2))
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 8) and y.shape == base(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for a in "ab":
        assert layer.c3a_kernel[a].grad is not None and not layer.c3a_kernel[a].grad.any()
    layer.eval()
    rows = [] if shape[0] == 0 else ["a", "__base__"]
    assert layer(x.detach(), adapter_names=rows).shape == y.shape


def test_meta_input_gives_meta_output_or_a_clear_error():
    with torch.device("meta"):
        meta_layer = C3ALinear(nn.Linear(12, 8), "a", block_size=4)
    x = torch.empty(3, 12, device="meta")
    y = meta_layer(x)
    assert y.device.type == "meta" and y.shape == (3, 8)
    layer = _layer(nn.Linear(12, 8), ("a", 4))
    with pytest.raises(ValueError, match="input is on the meta device but the layer's kernels are on cpu"):
        layer(x)


def test_unmerge_restores_base_after_kernel_changed_while_merged():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = _layer(copy.deepcopy(base), ("a", 4), ("b", 2))
    layer.merge()
    with torch.no_grad():  # an optimizer step, or a load, while merged
        layer.c3a_kernel["a"].mul_(3).add_(1)
        layer.c3a_kernel["b"].zero_()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-6)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, _dense_weight(layer, "ab"), base.bias),
                               rtol=1e-5, atol=1e-5)  # the changed kernels count from now on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disabling_a_merged_layer_and_enabling_it_restores_the_weight_bit_for_bit(monkeypatch, dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(dtype)
    layer = _layer(copy.deepcopy(base), ("a", 4), ("b", 8))
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    real = C3ALinear._remerged

    def rounding_otherwise(self, weight, adapters, kernels):  # as if merge∘unmerge were not the identity
        out = real(self, weight, adapters, kernels)
        out.view(-1)[::3] = torch.nextafter(out.view(-1)[::3], torch.tensor(float("inf"), dtype=out.dtype))
        return out

    monkeypatch.setattr(C3ALinear, "_remerged", rounding_otherwise)
    layer.enable_adapters(False)
    x = torch.randn(3, 16).to(dtype)
    assert not layer.merged and torch.equal(layer(x), layer.base_layer(x))
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with torch.no_grad():  # changed while disabled: merging back restores the merged state, old kernels included
        layer.c3a_kernel["a"].add_(1)
    layer.enable_adapters(True)
    assert layer.merged_adapters == ["a", "b"] and torch.equal(layer.base_layer.weight, merged)
    layer.unmerge()  # subtracts the kernels as merged
    torch.testing.assert_close(layer.base_layer.weight, base.weight, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_training_while_merged_warns():
    layer = _layer(nn.Linear(8, 8), ("a", 4))
    layer.merge()
    x = torch.randn(2, 8)
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # inference while merged: fine
        with torch.no_grad():
            layer.train()(x)
    with pytest.warns(UserWarning, match="merged into the base weight, so their kernels get no gradient"):
        layer.train()(x)


# -- one layer class per kind of base layer ---------------------------------------------------------------


def test_each_base_type_gets_its_layer_class_and_describes_its_delta(tiny_gpt2):
    from c3a import C3AConv1D
    from c3a.layer import c3a_layers, layer_class_for

    class MyLinear(nn.Linear):  # a subclass gets its nearest listed ancestor's class, and is never folded into
        pass

    conv = C3ALinear(Conv1D(8, 12), "a", block_size=4)  # the documented constructor, on a Conv1D base
    assert type(conv) is C3AConv1D and type(copy.deepcopy(conv)) is C3AConv1D
    assert (conv.delta_shape, conv.get_delta_weight("a").shape) == ((8, 12), (12, 8))  # ΔW (out, in), laid out (in, out)
    linear = C3ALinear(nn.Linear(12, 8), "a", block_size=4)
    assert type(linear) is C3ALinear and (linear.delta_shape, linear.get_delta_weight("a").shape) == ((8, 12), (8, 12))
    assert layer_class_for(MyLinear(12, 8)) is C3ALinear and not C3ALinear(MyLinear(12, 8), "a", 4)._fold_into_weight(
        torch.randn(10**4, 12))
    model = get_peft_model(tiny_gpt2, C3AConfig(block_size=8, target_modules=["c_attn"]))
    assert {type(layer) for _, layer in c3a_layers(model)} == {C3AConv1D}
    assert {layer.delta_shape for _, layer in c3a_layers(model)} == {(96, 32)}  # c_attn: 32 → 3·32


def test_bitsandbytes_layers_are_listed_by_name():  # an optional package: it need not be installed
    bnb = pytest.importorskip("bitsandbytes")
    from c3a.layer import LAYER_CLASSES, layer_class_for

    for kind in (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit):
        assert LAYER_CLASSES[f"{kind.__module__}.{kind.__qualname__}"] is C3ALinear
        assert layer_class_for(kind(32, 16)) is C3ALinear


class Rows(nn.Module):
    """A base layer kind C³A does not know: ``y = x·W + b`` with ``W`` stored ``(d_in, d_out)``, not a Linear."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_a_new_base_kind_is_one_class_and_one_mapping_entry(monkeypatch):
    from c3a.blocksize import target_shapes
    from c3a.layer import LAYER_CLASSES

    class C3ARows(C3ALinear):
        fan_in_fan_out = True
        plain_bases = ()  # not folded: only the FFT path

        @classmethod
        def base_features(cls, base):
            return base.weight.shape[0], base.weight.shape[1]

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), Rows(12, 16))
    config = C3AConfig(block_size=4, target_modules=["1"], init_weights="gaussian")
    with pytest.raises(TypeError, match="Rows"):
        get_peft_model(copy.deepcopy(net), config)
    monkeypatch.setitem(LAYER_CLASSES, Rows, C3ARows)
    assert target_shapes(net, ["1"]) == {"1": (12, 16)}
    model = get_peft_model(copy.deepcopy(net), copy.deepcopy(config))
    layer = model.base_model.model[1]
    assert type(layer) is C3ARows and layer.delta_shape == (16, 12)
    x = torch.randn(5, 8)
    hidden = net[0](x)
    expected = hidden @ net[1].weight + net[1].bias + hidden @ (circulant_matrix(layer.c3a_kernel["default"]) / 12).T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()  # the delta goes into the (d_in, d_out) weight the right way round
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
