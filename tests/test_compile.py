"""``torch.compile(fullgraph=True)`` (CPU inductor) on every path of the operator, training and inference.

Each compiled call is checked against the float64 dense reference with the eager path's own bound (conftest's
``half_tol`` for the half-precision GEMM paths, DFT and dense; for fp32, each of the three stages — transform, mixing, inverse, or the folded
GEMM — is a reduction of length ≤ L with relative error ≤ L·2^-24 in norm, so 4·L·2^-24 with room). Inductor may
reorder sums and fuse casts, which changes roundings, not the bound; a wrong path gives errors of order 1.
"""

import pytest
import torch
import torch.nn.functional as F

from c3a.functional import add_block_circular_conv, block_circulant_linear
from conftest import dense_reference, half_tol, rel_err

M, N = 2, 3


def _fp32_tol(reduction):
    return 4 * reduction * 2.0**-24


# name: (input dtype, autocast dtype, block size, how the delta is applied)
PATHS = {
    "fold-fp32": (torch.float32, None, 8, "fold"),
    "fft-fp32": (torch.float32, None, 8, "fft"),
    "fft-bf16": (torch.bfloat16, None, 7, "fft"),  # odd b in half precision on a wide layer: the fp32 FFT fallback
    "dft-bf16": (torch.bfloat16, None, 8, "dft"),
    "dft-fp16": (torch.float16, None, 8, "dft"),
    "dft-autocast-bf16": (torch.float32, torch.bfloat16, 8, "dft"),
    "dense-bf16": (torch.bfloat16, None, 7, "dense"),
    "dense-fp16": (torch.float16, None, 8, "dense"),
    "dense-autocast-bf16": (torch.float32, torch.bfloat16, 8, None),  # what the dispatch picks for a narrow layer
}


def _layer(x, weight, kernel, how, autocast):
    """A frozen layer plus the delta, as the C³A layer runs it: the base output is formed inside the graph."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if how == "fold":
            return block_circulant_linear(x, weight, None, [kernel])
        return add_block_circular_conv(F.linear(x, weight), x, [kernel], path=how, inplace=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name", list(PATHS))
def test_compiled_fullgraph_matches_dense_reference(name, training):
    dtype, autocast, b, how = PATHS[name]
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(b)
    x = torch.randn(2, 5, N * b, generator=g).to(dtype)
    weight = torch.zeros(M * b, N * b, dtype=dtype)  # zero: the error is the delta's alone
    kernel = torch.randn(M, N, b, generator=g)  # the layer's kernels are fp32
    grad = torch.randn(2, 5, M * b, generator=g)
    compiled = torch.compile(_layer, fullgraph=True)
    xr, kr = x.clone().requires_grad_(training), kernel.clone().requires_grad_(training)
    with torch.set_grad_enabled(training):
        y = compiled(xr, weight, kr, how, autocast)
    half = autocast or (dtype if dtype != torch.float32 else None)
    # the path sees x rounded to the half format under autocast; the reference uses the same rounded input
    ref, ref_gx, (ref_gk,) = dense_reference(torch.zeros(2, 5, M * b), x.to(half or dtype), [kernel], grad)
    on_gemm = half is not None and how != "fft"  # the DFT or the dense path: half-precision operands

    def tol(what, reduction):
        return half_tol(half, what, reduction) if on_gemm else _fp32_tol(reduction) + (
            2 * 2.0**-8 if half else 0  # the fallback rounds its fp32 delta (and gradients) to bf16 once
        )

    assert y.dtype == (half or dtype)
    assert rel_err(y, ref) <= tol("forward", N * b)
    if training:
        y.backward(grad.to(y.dtype))
        assert rel_err(xr.grad, ref_gx) <= tol("grad_x", M * b)
        assert rel_err(kr.grad, ref_gk) <= tol("grad_k", max(b, 10))


def test_compiled_peft_model_trains_and_infers_under_bf16_autocast():
    """The case that failed in inductor: a PEFT model (3-D activations, q/v adapted) compiled whole under bf16
    autocast, training step and ``no_grad`` inference. Compiled and eager run the same bf16 roundings in a different
    order, so they agree to a few bf16 units per layer (2 layers, ~6 roundings each: 16·2^-8 normwise), and the
    kernels' gradients are not zero."""
    from peft import get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from c3a import C3AConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = get_peft_model(
        RobertaForSequenceClassification(config),
        C3AConfig(block_size=16, target_modules=["query", "value"], init_weights="xavier_uniform", task_type="SEQ_CLS"),
    )
    ids, labels = torch.randint(0, 100, (4, 12)), torch.randint(0, 2, (4,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=labels).logits

    def grads(fn):
        model.zero_grad()
        logits = fn()
        logits.float().square().sum().backward()
        return logits.detach().float(), [p.grad.clone() for n, p in model.named_parameters() if "c3a_kernel" in n]

    compiled = torch.compile(step, fullgraph=True)
    (logits, kernel_grads), (eager_logits, eager_grads) = grads(compiled), grads(step)
    tol = 16 * 2.0**-8
    assert (logits - eager_logits).norm() <= tol * eager_logits.norm()
    assert len(kernel_grads) == 4 and all(e.norm() > 0 for e in eager_grads)
    for got, want in zip(kernel_grads, eager_grads):
        assert (got - want).norm() <= tol * want.norm()
    with torch.no_grad():
        assert (compiled().float() - eager_logits).norm() <= tol * eager_logits.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hotswap_into_a_compiled_model_does_not_recompile(tmp_path, dtype):
    """``c3a.hotswap_adapter`` on a ``torch.compile``'d model: the compiled graph is reused (recompiling is an
    error here) and computes what a fresh load of the new adapter computes, eagerly (to the dtype's rounding of
    the path, as in the tests above; bit-equality would hold only in eager mode)."""
    from peft import PeftModel, get_peft_model

    import c3a
    from c3a import C3AConfig

    def base():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(dtype)

    for name, seed in (("first", 1), ("second", 2)):
        frozen = base()
        torch.manual_seed(seed)  # the kernels' (gaussian) initialisation
        config = C3AConfig(block_size=8, target_modules=["0", "2"], init_weights="gaussian")
        get_peft_model(frozen, config).save_pretrained(tmp_path / name)
    torch._dynamo.reset()
    model = PeftModel.from_pretrained(base(), tmp_path / "first")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        before = compiled(x)
        c3a.hotswap_adapter(compiled, str(tmp_path / "second"), adapter_name="default")
        with torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled(x)
        fresh = PeftModel.from_pretrained(base(), tmp_path / "second")(x)
    tol = 4 * 32 * 2.0**-24 if dtype == torch.float32 else 2 * half_tol(dtype, "forward", 32)
    assert (after.double() - fresh.double()).norm() <= tol * fresh.double().norm()
    assert (before.double() - fresh.double()).norm() > 0.1 * fresh.double().norm()  # the swap changed the output
