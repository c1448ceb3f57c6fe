"""diffusers' layerwise casting (``enable_layerwise_casting``: weights stored in fp8, upcast per call by hooks on
the base layers) on a tiny UNet with C³A layers: it installs, the kernels stay fp32 (C³A layers are not what it
casts), and the base layers run through its hooks exactly as without the adapter."""

import torch
from peft import get_peft_model

from c3a import C3AConfig


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def test_layerwise_casting_over_c3a_layers():
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2]), torch.randn(2, 5, 32, generator=g)
    bare = _unet()
    bare.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    model = get_peft_model(_unet(), C3AConfig(block_size=8, target_modules=["to_q", "to_v"], init_weights="gaussian"))
    model.base_model.model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    layers = [m for n, m in model.named_modules() if n.endswith(("to_q", "to_v"))]
    assert len(layers) == 16 and all(type(m).__name__ == "C3ALinear" for m in layers)  # self- and cross-attention
    assert all(m.base_layer.weight.dtype == torch.float8_e4m3fn for m in layers)  # stored in fp8 by diffusers
    assert all(m.c3a_kernel["default"].dtype == torch.float32 for m in layers)  # the adapter is left alone
    with torch.no_grad():
        adapted = model(x, t, context).sample
        with model.disable_adapter():
            base_only = model(x, t, context).sample
        reference = bare(x, t, context).sample
    assert torch.equal(base_only, reference)  # the hooked base layers ran as in the model without C³A
    assert (adapted - base_only).abs().max() > 0.01  # and the kernels still act (gaussian init: not zero)
