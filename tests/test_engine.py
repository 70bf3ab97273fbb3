"""engine.py's evaluations, in process: ``engine.evaluate``, the released code's protocol
(L networks per batch, each with fresh draws, their logits averaged), and
``engine.evaluate_mean``, the mean network sign(M). (``evaluate.py``, the --evaluate
command around them, is tested through main.py.)"""
import copy

import pytest
import torch
import torch.nn.functional as F

from engine import evaluate, evaluate_mean
from models import build_model, is_binary
from optim import VISPA


def setup(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, width=4).double()
    opt = VISPA(model.parameters(), lr=0.1, K=3, S=4.0)
    model.train()  # give BatchNorm running statistics that are not the defaults
    with torch.no_grad(), opt.sampled_params():
        model(torch.randn(32, 3, 32, 32, dtype=torch.float64))
    batches = [(torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))) for _ in range(2)]
    return model, opt, batches


def top1(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_L_sample_evaluation_averages_the_logits_of_L_full_passes(name):
    L = 5
    model, opt, batches = setup(name)
    draws = opt.generator.get_state()
    result = evaluate(model, opt, batches, L)

    opt.generator.set_state(draws)  # the same draws, one full forward pass each
    model.eval()
    losses, logits, labels = [], [], []
    with torch.no_grad():
        for x, y in batches:
            passes = []
            for _ in range(L):
                with opt.sampled_params():
                    passes.append(model(x))
            logits.append(torch.stack(passes).mean(0))
            losses.append(torch.stack([F.cross_entropy(p, y) for p in passes]).mean() * len(y))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert result["loss"] == pytest.approx(torch.stack(losses).sum().item() / len(labels), rel=1e-9)
    assert result["prec1"] == pytest.approx(top1(logits, labels))
    top5 = logits.topk(5, 1).indices.eq(labels.view(-1, 1)).any(1).double().mean().item() * 100
    assert result["prec5"] == pytest.approx(top5)


def test_passes_differ_so_averaging_matters():
    model, opt, batches = setup("resnet18", seed=1)
    model.eval()
    x = batches[0][0]
    with torch.no_grad():
        with opt.sampled_params():
            a = model(x)
        with opt.sampled_params():
            b = model(x)
    assert not torch.allclose(a, b)


def test_mean_network_evaluation_uses_sign_of_M():
    model, opt, batches = setup("vgg16", seed=2)
    result = evaluate_mean(model, opt, batches)
    plain = copy.deepcopy(model).eval()  # a copy whose binary weights are set by hand
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            if is_binary(p):
                q.copy_(torch.sign(opt.state[p]["M"]))
        logits = torch.cat([plain(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert result["prec1"] == pytest.approx(top1(logits, labels))
    expected_loss = sum(F.cross_entropy(plain(x), y).item() * len(y) for x, y in batches) / len(labels)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-9)
