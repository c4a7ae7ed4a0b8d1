"""Segmentation networks: shapes, gradient flow, deep supervision, Mamba backends, errors."""

import pytest
import torch

from common.errors import ConfigError
from common.networks import MambaLayer, UMamba, as_output_list, create_model, list_models, mamba_ssm_available
from common.networks.mamba_layer import MAMBA_PARAM_NAMES

IN_SHAPE = (1, 3, 8, 16, 16)  # smallest size every model's total stride divides
# Names and shapes of mamba_ssm.Mamba's parameters (mamba_simple.py), spelled out on purpose.
MAMBA_SSM_KEYS = {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
}


def _model(name, **kw):
    torch.manual_seed(0)
    if name.startswith("umamba"):
        kw.setdefault("mamba_backend", "mambapy")
    return create_model(name, in_channels=3, out_channels=2, **kw)


def test_registry_lists_all_models():
    assert set(list_models()) == {"umamba-bot", "umamba-enc", "unet", "segresnet", "dynunet"}


@pytest.mark.parametrize("name", list_models())
def test_eval_output_shape(name):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(IN_SHAPE))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 2, *IN_SHAPE[2:])


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_finite_gradient(name):
    model = _model(name).train()
    outs = as_output_list(model(torch.randn(IN_SHAPE)))
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient: {missing}"
    assert not bad, f"non-finite gradient: {bad}"


@pytest.mark.parametrize("name", ["umamba-bot", "umamba-enc"])
def test_deep_supervision_outputs(name):
    model = _model(name).train()
    outs = model(torch.randn(IN_SHAPE))
    # Strides (1,1,1),(1,2,2),(2,2,2),(2,2,2): decoder outputs at full, 1/(1,2,2), 1/(2,4,4).
    assert [tuple(o.shape) for o in outs] == [(1, 2, 8, 16, 16), (1, 2, 8, 8, 8), (1, 2, 4, 4, 4)]
    model.deep_supervision = False
    assert model(torch.randn(IN_SHAPE)).shape == (1, 2, 8, 16, 16)


def test_as_output_list_treats_tensor_and_list_alike():
    t = torch.zeros(1)
    assert as_output_list(t) == [t]
    assert as_output_list([t, t]) == [t, t]


def test_mamba_layer_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = MambaLayer(16, backend="mambapy")
    x = torch.randn(2, 16, 3, 5, 7).to(torch.bfloat16)  # 105 tokens: not a power of two
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_mamba_layer_parallel_scan_matches_sequential_for_any_length():
    # mambapy pads the parallel scan to a power of two internally; results must not change.
    torch.manual_seed(0)
    fast = MambaLayer(8, backend="mambapy").eval()
    slow = MambaLayer(8, backend="mambapy", pscan=False).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(1, 8, 3, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), atol=1e-5, rtol=1e-5)


def test_mamba_block_keys_match_mamba_ssm():
    layer = MambaLayer(16, backend="mambapy")
    assert set(layer.mamba.state_dict()) == MAMBA_SSM_KEYS
    assert MAMBA_PARAM_NAMES == MAMBA_SSM_KEYS
    model = _model("umamba-bot")
    keys = {k.removeprefix("mamba_layer.mamba.") for k in model.state_dict() if k.startswith("mamba_layer.mamba.")}
    assert keys == MAMBA_SSM_KEYS


def test_umamba_checkpoint_loads_strictly_and_reproduces_outputs():
    torch.manual_seed(0)
    a = create_model("umamba-bot", mamba_backend="mambapy").eval()
    torch.manual_seed(1)
    b = create_model("umamba-bot", mamba_backend="mambapy").eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(IN_SHAPE)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.skipif(not mamba_ssm_available(), reason="needs CUDA and an importable mamba_ssm (GPU extra)")
def test_mamba_ssm_and_mambapy_agree_with_the_same_weights():
    torch.manual_seed(0)
    py = create_model("umamba-bot", mamba_backend="mambapy").cuda().eval()
    ssm = create_model("umamba-bot", mamba_backend="mamba_ssm").cuda().eval()
    ssm.load_state_dict(py.state_dict(), strict=True)
    x = torch.randn(IN_SHAPE, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ssm(x), py(x), atol=1e-3, rtol=0)


@pytest.mark.skipif(mamba_ssm_available(), reason="mamba_ssm is usable here")
def test_requesting_unavailable_mamba_ssm_is_a_config_error():
    with pytest.raises(ConfigError, match="mamba_ssm"):
        MambaLayer(8, backend="mamba_ssm")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="mambapy"):
        MambaLayer(8, backend="cuda")


@pytest.mark.parametrize("name", list_models())
def test_wrong_rank_raises_clear_error(name):
    model = _model(name)
    with pytest.raises(ValueError, match=r"5D input \(B, C, D, H, W\).*\(3, 8, 16, 16\)"):
        model(torch.randn(3, 8, 16, 16))


@pytest.mark.parametrize("name", list_models())
def test_non_divisible_size_raises_clear_error(name):
    model = _model(name)
    with pytest.raises(ValueError, match=r"\(8, 12, 16\) must be a multiple of \(\d+, \d+, \d+\)"):
        model(torch.randn(1, 3, 8, 12, 16))


def test_umamba_reports_required_multiple_and_channel_mismatch():
    model = _model("umamba-bot")
    assert model.required_multiple == (4, 8, 8)
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 8, 16, 16))


def test_unknown_model_name_lists_available_names():
    with pytest.raises(ConfigError) as err:
        create_model("vnet")
    for name in list_models():
        assert name in str(err.value)


def test_unknown_setting_is_rejected():
    with pytest.raises(ConfigError, match="featurez"):
        create_model("umamba-bot", featurez=(8, 16))


def test_bad_umamba_config_is_a_config_error():
    with pytest.raises(ConfigError, match="strides"):
        UMamba(features=(8, 16, 32), strides=(1, 2), mamba_backend="mambapy")
