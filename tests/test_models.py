import pytest
import torch

import models
from models.layers import BatchNorm2d


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_trains_one_step_on_cpu(name):
    torch.manual_seed(0)
    model = models.create_model(name)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]  # airbench94 freezes some on purpose
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert model(x).shape == (4, 10)
    assert models.create_model(name, num_classes=3)(x).shape == (4, 3)


@pytest.mark.parametrize("name, params, batchnorm", [
    ("resnet18", 11_173_962, True),  # the speedrun log's network, to the parameter
    ("bn_cnn", 268_746, True),  # the write-up's "~300K"
    ("simple_cnn", 2_122_186, False),
    ("resnet9", 6_573_120, True),
    ("cnn3", 2_159_114, False),  # the write-up's exploding 3-conv network, "~2.1M"
    ("cnn3_bn", 2_159_434, True),
    ("cnn3_fanin", 2_159_114, False),
    ("airbench94", 1_972_792, True),
])
def test_parameter_counts(name, params, batchnorm):
    model = models.create_model(name)
    assert models.count_params(model) == params
    assert models.has_batchnorm(model) is batchnorm


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="unknown model 'vgg'; valid names: airbench94, bn_cnn, cnn3, cnn3_bn, cnn3_fanin, resnet18, resnet9, simple_cnn"):
        models.create_model("vgg")


def test_bn_cnn_conservative_init():
    torch.manual_seed(0)
    m = models.create_model("bn_cnn")
    # Kaiming fan_in std is sqrt(2 / fan_in); linear layers are scaled by 0.5 on top.
    assert m.conv2.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)
    assert m.fc1.weight.std().item() == pytest.approx(0.5 * (2 / 2048) ** 0.5, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batchnorm_computes_in_fp32_with_half_weights(dtype):
    """As under DeepSpeed bf16/fp16: parameters in half precision, running stats in fp32."""
    ref = torch.nn.BatchNorm2d(8)
    bn = BatchNorm2d(8)
    bn.weight.data, bn.bias.data = bn.weight.data.to(dtype), bn.bias.data.to(dtype)
    x = torch.randn(16, 8, 4, 4)
    out = bn(x.to(dtype))
    assert out.dtype == dtype and bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref(x.to(dtype).float()), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert int(bn.num_batches_tracked) == 1


def test_cnn3_variants_change_one_thing():
    torch.manual_seed(0)
    plain = models.create_model("cnn3")
    torch.manual_seed(0)
    fanin = models.create_model("cnn3_fanin")
    # fan_out draws conv weights with std sqrt(2 / (out * 9)), fan_in with sqrt(2 / (in * 9)); linear x 0.5 on top
    w_out, w_in = plain.convs[2].weight, fanin.convs[2].weight
    assert abs(w_out.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005
    assert abs(w_in.std().item() - (2 / (64 * 9)) ** 0.5) < 0.005
    assert abs(fanin.fc1.weight.std().item() - 0.5 * (2 / 4096) ** 0.5) < 0.001
    assert abs(plain.fc1.weight.std().item() - (2 / 512) ** 0.5) < 0.002
    assert not models.has_batchnorm(plain) and models.has_batchnorm(models.create_model("cnn3_bn"))


def test_airbench_whitening_layer_whitens_the_patches_it_was_computed_from():
    torch.manual_seed(0)
    model = models.create_model("airbench94")
    mixing = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])  # correlated channels
    x = torch.einsum("ij,njhw->nihw", mixing, torch.randn(256, 3, 32, 32))
    model.init_from_data(x)
    w = model.whiten.weight
    assert w.shape == (24, 3, 2, 2) and not w.requires_grad
    assert torch.equal(w[12:], -w[:12])  # each filter and its negation
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    z = patches @ w[:12].reshape(12, 12).T
    cov = z.T @ z / len(z)
    assert torch.allclose(cov, torch.eye(12), atol=0.02)  # uncorrelated, unit variance (but for eps 5e-4: 0.99)
    # The whitening bias trains for the first 3 epochs only (it keeps its gradient); BatchNorm scales never train.
    assert models.hook(model, "freeze_after_epochs") == {"whiten.bias": 3} and model.whiten.bias.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("norm1.weight"))
    # Dirac init: each conv starts as the identity on its first input channels.
    conv = model.groups[1].conv1.weight
    assert conv[5, 5, 1, 1] == 1 and conv[5, 5].sum() == 1 and conv[5, 4].abs().sum() == 0
