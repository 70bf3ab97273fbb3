"""The fast paths compute the same function as the plain ones.

- sampling writes sign(M + r.Z) for the recorded draw r, in the layer's memory format;
- the training step (fused or torch's default SGD) equals torch.optim.SGD run on
  M, Z and the real parameters with gradients built by hand;
- the evaluation (stem once per batch, large batches) gives the logits of full
  passes over small batches with the same draws;
- the batch augmentation on the device has the distribution of torchvision's;
- bf16 autocast stays close to float32;
- checkpoints written in the background hold the state of the moment they were
  handed over, and a failure to write one is raised (that a run stopped while one is
  written resumes exactly is test_resume.py's).
"""
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

import engine
from data import DATASETS
from models import build_model, is_binary
from optim import VISPA
from utils import files, seeds
from utils.files import BackgroundSaver, FileError

CIFAR = DATASETS["cifar10"]
MEAN, STD = CIFAR.mean, CIFAR.std
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPU = torch.device("cpu")

# The memory formats main.py trains in: channels_last on CUDA, the contiguous format on
# the CPU. Not channels_last on the CPU: there, torch's oneDNN backward pass of a 1x1,
# stride-2 convolution (a ResNet shortcut) crashes the process with a segmentation fault,
# or hangs, on CPUs whose best instruction set is AVX2 (seen with torch 2.14.1 on an AMD
# EPYC; an AVX-512 CPU shows it with ONEDNN_MAX_CPU_ISA=AVX2), without any code of ours:
#
#     OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2 python -c "import torch
#     conv = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
#     x = torch.randn(16, 4, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
#     conv(x).sum().backward()"                 # exit status 139 (with 2 threads: sometimes a hang)
#
# The same convolution in the contiguous format, or with stride 1, or 3x3, runs fine.
FORMATS = [("cpu", torch.contiguous_format)] + [("cuda", f) for f in (torch.contiguous_format, torch.channels_last)
                                                 if torch.cuda.is_available()]


def network(name="resnet18", width=4, K=3, S=100.0, seed=0, device="cpu",
            memory_format=torch.contiguous_format, fused=None):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, width=width).to(device, memory_format=memory_format)
    opt = VISPA(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, K=K, S=S, fused=fused)
    return model, opt


def binary_weights(model):
    return [p for p in model.parameters() if is_binary(p)]


# ---- sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sample_is_sign_of_mean_plus_recorded_draw_in_the_layers_memory_format(memory_format):
    K, S = 4, 100.0
    model, opt = network(K=K, S=S, memory_format=memory_format)
    for _ in range(3):  # three fresh draws
        with opt.sampled_params(train=True) as draws:
            compared = 0
            for p, r in zip(binary_weights(model), draws):
                state = opt.state[p]
                r = r.double()
                latent = state["M"].double() + (r.view((K,) + (1,) * p.dim()) * state["Z"].double()).sum(0)
                clear = latent.abs() > 1e-6  # float32 rounding cannot flip these
                assert torch.equal(p.detach().double()[clear], latent.sign()[clear])
                assert p.is_contiguous(memory_format=memory_format) or p.dim() != 4
                compared += int(clear.sum())
        assert compared > 0.999 * sum(p.numel() for p in binary_weights(model))


# ---- the training step ---------------------------------------------------------------------

@pytest.mark.parametrize("device, memory_format", FORMATS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("fused", [None, True, False])
def test_training_steps_equal_plain_sgd_on_M_Z_and_real_params(device, fused, memory_format):
    """Four steps with a changing lr; in the first one the classifier gets no gradient,
    so that its momentum starts a step later than the others' (the fused kernel starts
    momenta per call)."""
    K, S, wd, momentum = 3, 100.0, 5e-4, 0.9
    model, opt = network(K=K, S=S, device=device, memory_format=memory_format, fused=fused)
    binaries = binary_weights(model)
    reals = [p for p in model.parameters() if not is_binary(p)]
    plain = {p: [opt.state[p]["M"].clone(), opt.state[p]["Z"].clone()] for p in binaries}
    plain.update({p: [p.detach().clone()] for p in reals})
    leaves = [t.requires_grad_() for ts in plain.values() for t in ts]
    reference = torch.optim.SGD(leaves, lr=0.1, momentum=momentum, weight_decay=wd, foreach=False)
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (16,), device=device)

    for step, lr in enumerate([0.1, 0.05, 0.2, 0.1]):
        for group in opt.param_groups + reference.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with opt.sampled_params(train=True) as draws:
            F.cross_entropy(model(x), y).backward()
            weight_grads = [p.grad.double() for p in binaries]
        if step == 0:
            model.linear.weight.grad = None
        for p, g, r in zip(binaries, weight_grads, draws):
            r = r.double()
            M, Z = plain[p]
            M.grad = g.float().contiguous()
            Z.grad = torch.stack([math.sqrt(S) * r[k] * g for k in range(K)]).float()
        for p in reals:
            plain[p][0].grad = None if p.grad is None else p.grad.clone()
        opt.step()
        reference.step()
        for p in binaries:
            torch.testing.assert_close(opt.state[p]["M"], plain[p][0].detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["Z"], plain[p][1].detach(), rtol=1e-5, atol=1e-7)
        for p in reals:
            torch.testing.assert_close(p.detach(), plain[p][0].detach(), rtol=1e-5, atol=1e-7)
    assert "momentum_buffer" in opt.state[model.linear.weight]
    assert all("Z_momentum" in opt.state[p] for p in binaries)


# ---- evaluation ----------------------------------------------------------------------------

def trained_a_little(name):
    """A network whose BatchNorm running statistics are not the defaults."""
    model, opt = network(name, width=8)
    model.train()
    with torch.no_grad(), opt.sampled_params():
        model(torch.randn(64, 3, 32, 32))
    return model, opt


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_evaluation_with_stem_reuse_and_large_batches_equals_plain_small_batch_passes(name):
    """engine.predict (the stem once per batch of 50) against full passes over
    sub-batches of 16, with the same draws; and engine.evaluate's figures from them."""
    L, big, small = 3, 50, 16
    model, opt = trained_a_little(name)
    torch.manual_seed(5)
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (100,))
    loader = CIFAR.loader(images, labels, big, False, CPU)
    model.eval()

    def plain():
        """Every pass: one draw, then the whole network over sub-batches of ``small``."""
        logits, losses = [], []
        with torch.no_grad():
            for x, y in loader:
                passes = []
                for _ in range(L):
                    with opt.sampled_params():
                        passes.append(torch.cat([model(part) for part in x.split(small)]))
                logits.append(torch.stack(passes).mean(0))
                losses.append(torch.stack([F.cross_entropy(p, y) for p in passes]).mean().item())
        return logits, losses

    draws = opt.generator.get_state()
    got = [engine.predict(model, opt, x, y, L) for x, y in loader]
    opt.generator.set_state(draws)
    result = engine.evaluate(model, opt, loader, L)
    opt.generator.set_state(draws)
    expected_logits, expected_losses = plain()
    assert len(got) == len(expected_logits) == 2
    for prediction, want, want_loss in zip(got, expected_logits, expected_losses):
        torch.testing.assert_close(prediction.logits, want, rtol=1e-4, atol=1e-4)
        assert prediction.loss.item() == pytest.approx(want_loss, rel=1e-5)
    everything = torch.cat(expected_logits)
    assert result["prec1"] == pytest.approx(100.0 * (everything.argmax(1) == labels).double().mean().item())
    assert result["loss"] == pytest.approx(sum(l * 50 for l in expected_losses) / 100, rel=1e-5)
    # the comparison rests on the draws: other draws give other logits
    opt.generator.manual_seed(8)
    other_logits, _ = plain()
    assert not torch.allclose(torch.cat(other_logits), everything, rtol=1e-4, atol=1e-4)


# ---- augmentation --------------------------------------------------------------------------

def pattern_images(n):
    """Every pixel says where it came from: R = 7 * (row + 1), G = 7 * (column + 1),
    B = 255; the zero padding is 0 in all three."""
    index = torch.arange(1, 33) * 7
    image = torch.stack([index.view(32, 1).expand(32, 32), index.view(1, 32).expand(32, 32),
                         torch.full((32, 32), 255)]).to(torch.uint8)
    return image.expand(n, 3, 32, 32).contiguous()


def to_pixels(normalised):
    """Invert ToTensor + Normalize: back to the uint8 pixel values."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return torch.round((normalised * std + mean) * 255).long()


def crop_of(oy, ox, flip):
    """The pattern image shifted by (oy, ox) with zero fill, then flipped: output pixel
    (i, j) shows pattern pixel (i + oy, j' + ox), j' = 31 - j if flipped else j."""
    rows = torch.arange(32).view(32, 1).expand(32, 32) + oy
    j = torch.arange(32).view(1, 32).expand(32, 32)
    cols = (31 - j if flip else j) + ox
    inside = (rows >= 0) & (rows < 32) & (cols >= 0) & (cols < 32)
    out = torch.stack([7 * (rows + 1), 7 * (cols + 1), torch.full((32, 32), 255)])
    return torch.where(inside, out, torch.zeros_like(out))


def offsets_and_flips(pixels):
    """(row offset, column offset, flipped) of every augmented pattern image; each image
    is checked to be exactly the crop those describe (pattern inside, zeros outside)."""
    found = []
    for image in pixels:
        i, j = [int(v[0]) for v in torch.nonzero(image[2] == 255, as_tuple=True)]  # top left inside
        flip = image[1, i, j + 1] < image[1, i, j]  # the inside is at least 28 pixels wide
        oy = int(image[0, i, j]) // 7 - 1 - i
        col = int(image[1, i, j]) // 7 - 1
        ox = col - (31 - j if flip else j)
        found.append((oy, ox, bool(flip)))
    return found


def check_is_crop(pixels, found):
    cache = {}
    for image, key in zip(pixels, found):
        if key not in cache:
            cache[key] = crop_of(*key)
        assert torch.equal(image, cache[key]), key


def test_device_augmentation_has_the_distribution_of_torchvisions():
    n = 3000
    images, labels = pattern_images(n), torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    ours = torch.cat([x for x, _ in CIFAR.loader(images, labels, 500, True, CPU)])
    torch.manual_seed(0)
    theirs = torch.cat([x for x, _ in CIFAR.reference_loader(images, labels, 500, True, workers=0)])
    results = {}
    for name, batch in (("ours", to_pixels(ours)), ("torchvision", to_pixels(theirs))):
        found = offsets_and_flips(batch)
        check_is_crop(batch, found)  # pixel-exact crops with zero padding
        results[name] = found

    p = 1 / 9
    bin_std = math.sqrt(n * p * (1 - p))
    flip_std = math.sqrt(n * 0.25)
    histograms = {}
    for name, found in results.items():
        oy = torch.tensor([f[0] for f in found])
        ox = torch.tensor([f[1] for f in found])
        flips = sum(f[2] for f in found)
        assert oy.min() == -4 and oy.max() == 4 and ox.min() == -4 and ox.max() == 4, name
        histograms[name] = [torch.bincount(o + 4, minlength=9).double() for o in (oy, ox)]
        for counts in histograms[name]:
            assert ((counts - n * p).abs() < 5 * bin_std).all(), (name, counts)
        assert abs(flips - n / 2) < 5 * flip_std, (name, flips)
        assert len({(f[0], f[1]) for f in found}) == 81, name  # every offset pair occurs
    for ours_counts, theirs_counts in zip(histograms["ours"], histograms["torchvision"]):
        assert ((ours_counts - theirs_counts).abs() < 5 * math.sqrt(2) * bin_std).all()


# ---- bf16 ------------------------------------------------------------------------------------

def test_bf16_evaluation_and_training_stay_close_to_float32():
    model, opt = trained_a_little("resnet18")
    torch.manual_seed(5)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    x = next(iter(CIFAR.loader(images, labels, 64, False, CPU)))[0]
    model.eval()
    draws = opt.generator.get_state()
    logits = {}
    for bf16 in (False, True):
        opt.generator.set_state(draws)
        logits[bf16] = engine.predict(model, opt, x, labels, 2, bf16)[0]
    error = (logits[True] - logits[False]).norm() / logits[False].norm()
    assert 0 < error < 0.05

    losses = {}
    for bf16 in (False, True):
        model, opt = network(width=8)
        torch.manual_seed(4)
        loader = CIFAR.loader(images, labels, 32, True, CPU)
        losses[bf16] = engine.train_one_epoch(model, opt, loader, lambda it: 0.05, 0, bf16)["loss"]
    assert math.isfinite(losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


# ---- checkpoints in the background ---------------------------------------------------------

def test_background_checkpoint_holds_the_state_of_the_moment_it_was_handed_over(tmp_path):
    model, opt = network()
    with opt.sampled_params(train=True):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": [1]}
    expected = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "M": [opt.state[p]["M"].clone() for p in binary_weights(model)]}
    saver = BackgroundSaver()
    saver.submit([(state, str(tmp_path / "a.pth")), (state, str(tmp_path / "b.pth"))])
    with torch.no_grad():  # training goes on at once
        for p in model.parameters():
            p.add_(1.0)
        for p in binary_weights(model):
            opt.state[p]["M"].add_(1.0)
    state["history"].append(2)
    saver.wait()
    for name in ("a.pth", "b.pth"):
        saved = files.load(str(tmp_path / name))
        assert saved["history"] == [1]
        for key, value in expected["model"].items():
            assert torch.equal(saved["model"][key], value), key
        fresh, fresh_opt = network(seed=9)
        fresh.load_state_dict(saved["model"])  # strict, with the state_dict's version metadata
        fresh_opt.load_state_dict(saved["optimizer"])
        for p, M in zip(binary_weights(fresh), expected["M"]):
            assert torch.equal(fresh_opt.state[p]["M"], M)


def test_a_failed_background_write_is_raised_and_leaves_no_file(tmp_path):
    saver = BackgroundSaver()
    saver.submit([({"x": torch.ones(3)}, str(tmp_path / "missing" / "c.pth"))])
    with pytest.raises(FileError, match="could not write"):
        saver.wait()
    saver.wait()  # raised once; nothing in flight now

    saver.submit([({"x": torch.ones(3), "not data": lambda: 0}, str(tmp_path / "e.pth"))])
    with pytest.raises(Exception, match="lambda"):  # the next submit raises it first
        saver.submit([({"x": torch.ones(3)}, str(tmp_path / "d.pth"))])
    assert os.listdir(tmp_path) == []  # no file, no temporary left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_random_states_restore_from_a_checkpoint_loaded_onto_the_gpu():
    device = torch.device("cuda")
    buffer = io.BytesIO()
    torch.save(seeds.rng_states(device), buffer)
    expected = torch.rand(3), torch.rand(3, device=device).cpu()
    buffer.seek(0)
    seeds.set_rng_states(torch.load(buffer, map_location=device, weights_only=True), device)
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, device=device).cpu(), expected[1])
