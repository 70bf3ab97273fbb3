"""The exported binary network (models/packed.py, ``main.py --export``): sign(M) at one bit
per weight, the rest float32. By default it is the deployed network, whose BatchNorm
statistics are recomputed on training images; with ``--recalibrate 0`` the mean network
with the statistics of training. Loaded back as a plain module it computes that network
bit for bit, and ``--evaluate`` of it gives the figure the training log gives for it."""
import math
import os

import numpy as np
import pytest
import torch

from data import DATASETS, normalize
from helpers import TINY, assert_clear_error, folder_digest, load_checkpoint, run_main
from models import build_model, is_binary, load_packed, packed
from optim import VISPA
from utils.run_dir import RunDir


def test_bits_round_trip_with_zeros_in_any_shape():
    """The bits, derived by hand: weight i of the flat tensor is bit 7 - i % 8 of byte i // 8
    (1 for +1), the last byte padded with zeros; a sign of 0 is kept by its position."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(3,), (5, 3, 3, 3), (7, 2), (8,), (1, 1, 1, 1)]:
        signs = torch.sign(torch.randn(shape, generator=generator, dtype=torch.float64))
        signs.view(-1)[::5] = 0
        p = packed.pack_bits(signs)
        flat = signs.view(-1).numpy()
        expected = np.zeros(math.ceil(flat.size / 8), dtype=np.uint8)
        for i, s in enumerate(flat):
            if s > 0:
                expected[i // 8] |= 1 << (7 - i % 8)
        np.testing.assert_array_equal(p["bits"].numpy(), expected)
        assert p["zeros"].tolist() == [i for i, s in enumerate(flat) if s == 0]
        assert torch.equal(packed.unpack_bits(p, torch.float64), signs)


MODELS = ["resnet18", "vgg16", "resnet18_1w1a", "vgg_small"]


@pytest.fixture(scope="module")
def exports(cifar10_root, tmp_path_factory):
    """``exports(model)``: a narrow network of that kind trained one epoch, and its
    export (made once per module)."""
    made = {}

    def get(model):
        if model not in made:
            results = tmp_path_factory.mktemp(f"export-{model}")
            width = {"vgg_small": 16}.get(model, 8)
            run = run_main(*TINY, "--model", model, "--width", width, "--epochs", 1, "-b", 100,
                           "--data_root", cifar10_root, "--results_dir", results, "--save", "run")
            assert run.returncode == 0, run.stderr
            out, mean = results / "model.bnn", results / "mean.bnn"
            export = run_main("--export", results / "run" / "model_best.pth.tar", "--out", out)
            assert export.returncode == 0, export.stderr
            plain = run_main("--export", results / "run" / "model_best.pth.tar", "--out", mean, "--recalibrate", 0)
            assert plain.returncode == 0, plain.stderr
            made[model] = dict(model=model, width=width, results=results, out=out, mean=mean, stdout=export.stdout)
        return made[model]
    return get


@pytest.fixture(params=MODELS)
def trained(request, exports):
    return exports(request.param)


def checkpoint_network(trained):
    ckpt = load_checkpoint(trained["results"] / "run" / "model_best.pth.tar")
    network = build_model(trained["model"], 10, trained["width"])
    opt = VISPA(network.parameters(), lr=0.1, K=2)
    network.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    return network.eval(), opt, ckpt


def test_the_exported_mean_network_computes_the_checkpoints_bit_for_bit(trained, cifar10_root):
    """--recalibrate 0: sign(M) with the BatchNorm statistics of training."""
    network, opt, _ = checkpoint_network(trained)
    exported = load_packed(str(trained["mean"]))
    assert isinstance(exported, torch.nn.Module) and not exported.training
    images, labels = DATASETS["cifar10"].read(cifar10_root, "test")
    x = normalize(images, *[torch.load(trained["mean"], weights_only=True)[k] for k in ("mean", "std")])
    with torch.no_grad(), opt.mean_params():
        expected = network(x)
    with torch.no_grad():
        got = exported(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_the_exported_deployed_network_has_the_statistics_of_sign_m_on_training_images(trained, cifar10_root):
    """The default: every BatchNorm's running statistics are the cumulative averages, over
    the run's recalibration batches (its training images, read as training reads them), of
    the batch means and unbiased variances of sign(M)'s network in train mode: here
    computed by torch's own routine (update_bn) on the same batches."""
    from torch.optim.swa_utils import update_bn

    import config
    from factory import DataFolder, recalibration_batches
    from utils.distributed import World
    network, opt, ckpt = checkpoint_network(trained)
    cfg = config.Config.from_dict(ckpt["config"])
    batches = recalibration_batches(cfg, DataFolder(cifar10_root), torch.device("cpu"), World())
    first, again = [x for x, _ in batches], [x for x, _ in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "a second pass read other images"
    labels = DATASETS["cifar10"].read(cifar10_root, "train")[1]
    assert sum(len(x) for x in first) == len(labels) and {len(x) for x in first[:-1]} == {cfg.batch_size}
    with opt.mean_params():
        update_bn(first, network)
    network.eval()
    exported = load_packed(str(trained["out"]))
    expected = {k: v for k, v in network.state_dict().items() if "running" in k}
    got = {k: v for k, v in exported.state_dict().items() if "running" in k}
    assert expected and sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    content = torch.load(trained["out"], weights_only=True)
    assert content["statistics"] == {"source": "recomputed", "images": len(labels)}
    assert torch.load(trained["mean"], weights_only=True)["statistics"] == {"source": "training"}


def test_evaluating_an_export_gives_the_figure_the_log_gives_for_it(trained, cifar10_root):
    """The deployed network of the best epoch (evaluated at the end of the run) and, with
    --recalibrate 0, the mean network: the same top-1, NLL, ECE and Brier, to the digit."""
    run = RunDir(str(trained["results"]), "run")
    row = next(row for row in run.read_metrics() if row["epoch"] == run.status().best_epoch)
    for out, prefix, what in ((trained["out"], "deployed", "the deployed network"),
                              (trained["mean"], "mean", "the mean network")):
        result = run_main("--evaluate", out, "--gpus", "cpu")  # the data folder: the one the run was trained on
        assert result.returncode == 0, result.stderr
        line = [l for l in result.stdout.splitlines() if l.startswith("Test: ")][0]
        assert f"Prec@1 {row[prefix + '_prec1']:.2f}  " in line and line.endswith(f"({what} sign(M))")
        calibration = [l for l in result.stdout.splitlines() if l.startswith("Calibration: ")][0]
        assert calibration == (f"Calibration: NLL {row[prefix + '_nll']:.4f}  ECE {row[prefix + '_ece']:.2f}  "
                               f"Brier {row[prefix + '_brier']:.4f}")


def test_the_export_is_plain_data_with_its_bits_and_what_to_build(trained):
    content = torch.load(trained["out"], weights_only=True)
    assert (content["format"], content["version"], content["model"], content["width"], content["num_classes"],
            content["image_size"], content["dataset"]) == ("vispa-binary-network", 3, trained["model"],
                                                         trained["width"], 10, 32, "cifar10")
    assert content["classes"] is None  # the paper's datasets have their classes
    assert content["mean"] == list(DATASETS["cifar10"].mean) and content["std"] == list(DATASETS["cifar10"].std)
    network = build_model(trained["model"], 10, trained["width"])
    binary = {n: p.numel() for n, p in network.named_parameters() if is_binary(p)}
    assert sorted(content["binary"]) == sorted(binary)
    for name, count in binary.items():
        assert content["binary"][name]["bits"].dtype == torch.uint8
        assert content["binary"][name]["bits"].numel() == math.ceil(count / 8)
    assert not set(binary) & set(content["state"])
    assert all(t.dtype == torch.float32 for t in content["state"].values() if t.is_floating_point())


# ---- the paper's networks at full size ---------------------------------------------------------

def released_file(path, model, classes):
    """A full-size file in the authors' layout (zero factors Z that cost no disk)."""
    network = build_model(model, classes)
    opt = VISPA(network.parameters(), lr=0.1, K=8)
    from models import released
    state = released.to_released(network, {n: (opt.state[p]["M"], torch.zeros(1).expand(8, *p.shape))
                                            for n, p in network.named_parameters() if is_binary(p)})
    torch.save({"epoch": 0, "state_dict": state}, path)
    return network


@pytest.mark.parametrize("model, at_most", [("vgg16", 1 / 25), ("resnet18", 1 / 18)])
def test_the_papers_networks_export_at_a_small_fraction_of_their_float32_size(tmp_path, model, at_most):
    """One bit per binary weight: VGG16's file is under 1/25 of its float32 state_dict.
    ResNet18's full-precision shortcuts and classifier (0.25 M float32 values, 1 MB - a
    fortieth of the whole) are stored as they are, so its file is about 1/18.6."""
    network = released_file(tmp_path / "released.pth", model, 100)
    r = run_main("--export", tmp_path / "released.pth", "--model", model, "--dataset", "cifar100",
                 "--out", tmp_path / "model.bnn", "--recalibrate", 0)
    assert r.returncode == 0, r.stderr
    full = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in network.state_dict().values())
    size = os.path.getsize(tmp_path / "model.bnn")
    assert size <= at_most * full
    assert f"{size / 1e6:.2f} MB, 1/{full / size:.1f} of its float32 state_dict" in r.stdout


# ---- bad input ---------------------------------------------------------------------------------

def test_what_is_not_an_export_is_refused(exports, cifar10_root, tmp_path):
    trained = exports("resnet18")
    text = tmp_path / "notes.bnn"
    text.write_text("not a network\n")
    truncated = tmp_path / "truncated.bnn"
    truncated.write_bytes(trained["out"].read_bytes()[:-300])
    newer = tmp_path / "newer.bnn"
    content = torch.load(trained["out"], weights_only=True)
    packed.save(dict(content, version=4), str(newer))
    ours = trained["results"] / "run" / "checkpoint.pth.tar"
    cases = [(text, "cannot read"), (truncated, "cannot read"),
             (newer, "is an exported network of format version 4; this version reads versions 1 to 3")]
    for path, message in cases:
        before = folder_digest(tmp_path)
        assert_clear_error(run_main("--evaluate", path, "--data_root", cifar10_root, "--gpus", "cpu"), message)
        assert folder_digest(tmp_path) == before
    # a training checkpoint is evaluated as one, not as an export
    assert run_main("--evaluate", ours, "-L", 1, "--data_root", cifar10_root, "--gpus", "cpu").returncode == 0


def test_settings_of_a_distribution_are_refused_for_an_exported_network(exports, cifar10_root):
    """One network with the statistics it was exported with: no rank, scale, method or
    recalibration to apply."""
    trained = exports("resnet18")
    assert_clear_error(run_main("--evaluate", trained["out"], "--data_root", cifar10_root, "--gpus", "cpu", "-K", 3,
                                "--recalibrate", 100), "-K and --recalibrate do not apply to it; leave them out")


def test_an_export_that_cannot_be_made_writes_nothing(exports, tmp_path):
    trained = exports("resnet18")
    before = folder_digest(tmp_path)
    best = trained["results"] / "run" / "model_best.pth.tar"
    assert_clear_error(run_main("--export", tmp_path / "missing.pth", "--out", tmp_path / "a.bnn"),
                       "checkpoint not found")
    assert_clear_error(run_main("--export", best, "--out", tmp_path / "no" / "a.bnn"), "does not exist")
    assert_clear_error(run_main("--export", best), "--export FILE and --out FILE go together")
    assert folder_digest(tmp_path) == before
    (tmp_path / "taken.bnn").write_text("mine")
    assert_clear_error(run_main("--export", best, "--out", tmp_path / "taken.bnn"),
                       "exists: choose another --out, or add --overwrite")
    assert (tmp_path / "taken.bnn").read_text() == "mine"


def test_an_export_without_its_training_images_says_what_to_do(exports, tmp_path):
    trained = exports("resnet18")
    best = trained["results"] / "run" / "model_best.pth.tar"
    line = assert_clear_error(run_main("--export", best, "--out", tmp_path / "a.bnn", "--data_root",
                                       tmp_path / "nowhere"), "not found")
    assert "--recalibrate 0" in line
    assert os.listdir(tmp_path) == []


def test_an_exported_network_of_version_1_carries_the_statistics_of_training(exports, cifar10_root, tmp_path):
    trained = exports("resnet18")
    content = torch.load(trained["mean"], weights_only=True)
    old = {k: v for k, v in content.items() if k not in ("statistics", "data_root", "classes", "digest")}
    packed.save(dict(old, version=1), str(tmp_path / "old.bnn"))
    result = run_main("--evaluate", tmp_path / "old.bnn", "--data_root", cifar10_root, "--gpus", "cpu")
    assert result.returncode == 0, result.stderr
    assert "with the BatchNorm statistics of training (gathered on sampled networks)" in result.stdout
