"""The networks and the update against the authors' own code.

``reference/golden/resnet18_w8_k4.pt`` (1W32A) and ``resnet18_1w1a_w8_k4.pt`` (1W1A:
binary activations, hardtanh, the average-pool and zero-pad shortcut) were produced
by running the authors' code (their CIFAR ResNet class at widths 8/16/32/64, K = 4,
S = 100, 10 classes, float64): a network in their released layout, inputs, labels,
the draw ``r`` of every binary layer, the logits it gives in evaluation and in
training, the loss, and every tensor after one torch.optim.SGD step. They are the
judge here: our ResNet18 of the file's mode, filled from that state, must reproduce
all of it to float64 rounding. Every test that takes ``golden`` runs on both files.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from models import build_model, is_binary, released
from models.resnet import resnet18, resnet18_1w1a
from optim import VISPA

GOLDEN = os.path.join(os.path.dirname(__file__), "reference", "golden")
GOLDEN_FILES = ["resnet18_w8_k4.pt", "resnet18_1w1a_w8_k4.pt"]
# The network each file was produced with, by its "mode" (the 1W32A file has none).
FACTORIES = {"1w32a": resnet18, "1w1a": resnet18_1w1a}
TOLERANCE = 1e-12  # relative, in float64
# On CUDA as main.py runs there: channels_last, and VISPA's fused SGD update.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def relative_difference(ours, theirs):
    """max |ours - theirs| / max |theirs| (exact equality required of a zero tensor)."""
    ours, theirs = ours.double(), theirs.double()
    scale = theirs.abs().max().item()
    difference = (ours - theirs).abs().max().item()
    return difference / scale if scale > 0 else difference


def golden_network(golden, device="cpu"):
    """Our network of the golden file's mode and VISPA, filled from the file's
    released-layout state (on ``device``, channels_last on CUDA as main.py has it)."""
    width = golden["widths"][0]
    assert list(golden["widths"]) == [width, 2 * width, 4 * width, 8 * width]
    torch.manual_seed(0)
    factory = FACTORIES[golden.get("mode", "1w32a")]
    model = factory(num_classes=golden["num_classes"], width=width).double()
    if device != "cpu":
        model.to(device, memory_format=torch.channels_last)
    opt = VISPA(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, K=golden["K"], S=golden["S"])
    found = released.from_released(golden["state_before"], model)
    assert found.K == golden["K"] and not found.dropped
    model.load_state_dict(found.model_state)
    params = dict(model.named_parameters())
    for param_name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[param_name], M.to(device), Z.to(device))
    return model, opt


def on(device, golden, *keys):
    """The golden entries ``keys`` on ``device`` (the draws: a list of tensors)."""
    moved = []
    for key in keys:
        value = golden[key]
        moved.append([r.to(device) for r in value] if isinstance(value, (list, tuple)) else value.to(device))
    return moved


def distributions(model, opt):
    return {name: (opt.state[p]["M"], opt.state[p]["Z"]) for name, p in model.named_parameters()
            if is_binary(p)}


@pytest.fixture(scope="module", params=GOLDEN_FILES)
def golden(request):
    return torch.load(os.path.join(GOLDEN, request.param), weights_only=True)


def test_golden_file_is_the_networks_layout(golden):
    model, opt = golden_network(golden)
    assert list(released.to_released(model, distributions(model, opt))) == list(golden["state_before"])
    assert len(golden["draws"]) == len(opt.binary_params()) == 16


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_logits_of_the_mean_network_and_of_given_draws(golden, device):
    model, opt = golden_network(golden, device)
    inputs, draws = on(device, golden, "inputs", "draws")
    model.eval()
    with torch.no_grad():
        with opt.mean_params():
            mean = model(inputs).cpu()
        with opt.sampled_params(draws=draws):
            sampled = model(inputs).cpu()
    assert relative_difference(mean, golden["eval_logits_mean_network"]) <= TOLERANCE
    assert relative_difference(sampled, golden["eval_logits_with_draws"]) <= TOLERANCE
    assert relative_difference(mean, sampled) > 1e-3  # the draws matter


@pytest.mark.parametrize("device", DEVICES)
def test_one_training_step_updates_every_tensor_as_the_authors_code(golden, device):
    """Training-mode logits and loss with the given draws, then one step (lr 0.1,
    momentum 0.9, weight decay 5e-4): every M, Z, Alpha, real parameter and BatchNorm
    running statistic of the golden state after the step."""
    model, opt = golden_network(golden, device)
    inputs, labels, draws = on(device, golden, "inputs", "labels", "draws")
    model.train()
    opt.zero_grad()
    with opt.sampled_params(train=True, draws=draws):
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    assert relative_difference(logits.detach().cpu(), golden["train_logits"]) <= TOLERANCE
    assert relative_difference(loss.detach().cpu(), golden["train_loss"]) <= TOLERANCE
    opt.step()

    after = {key: value.cpu() for key, value in released.to_released(model, distributions(model, opt)).items()}
    expected = golden["state_after"]
    assert list(after) == list(expected)
    moved = 0
    for key, value in expected.items():
        if value.is_floating_point():
            assert relative_difference(after[key], value) <= TOLERANCE, key
            moved += not torch.equal(value, golden["state_before"][key])
        else:
            assert torch.equal(after[key], value), key
    assert moved > 0.9 * sum(v.is_floating_point() for v in expected.values())


def test_the_stem_has_no_activation(golden):
    """What the golden data pins down, stated directly: the stem's output is
    bn1(conv1(x)), negative values included."""
    model, _ = golden_network(golden)
    model.eval()
    with torch.no_grad():
        stem = model.stem(golden["inputs"])
        expected = model.bn1(F.conv2d(golden["inputs"], model.conv1.weight, padding=1))
    assert torch.equal(stem, expected) and (stem < 0).any()


def test_vgg16_batchnorm_momenta_are_0_2_in_the_convs_and_0_1_in_the_classifier():
    """Three training steps; each BatchNorm's running statistics follow
    r <- (1 - m) r + m * (batch mean, unbiased batch variance) of its own input, with
    m = 0.2 for bn1..bn13 and m = 0.1 for bn14..bn16 (written out here)."""
    torch.manual_seed(3)
    model = build_model("vgg16", num_classes=10, width=8).double()
    opt = VISPA(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, K=2, S=100.0)
    norms = {f"bn{i}": getattr(model, f"bn{i}") for i in range(1, 17)}
    inputs = {}
    hooks = [bn.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, bn in norms.items()]
    expected = {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in norms.items()}
    model.train()
    for _ in range(3):
        x, y = torch.randn(12, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (12,))
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        for name in norms:
            m = 0.1 if name in ("bn14", "bn15", "bn16") else 0.2
            values = inputs[name].transpose(0, 1).reshape(inputs[name].shape[1], -1)
            mean, var = expected[name]
            expected[name] = ((1 - m) * mean + m * values.mean(1), (1 - m) * var + m * values.var(1, unbiased=True))
    for hook in hooks:
        hook.remove()
    for name, bn in norms.items():
        torch.testing.assert_close(bn.running_mean, expected[name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bn.running_var, expected[name][1], rtol=1e-12, atol=1e-14)
