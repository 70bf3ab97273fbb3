"""The evaluate scripts on checkpoints in the authors' released layouts and in this
project's own format.

A released-layout file is built from a key list in ``tests/reference/`` (every key,
shape and dtype of the authors' files, in each layout their code wrote: today's; the
code of 2024 with an unused zero ``.sample`` per binary layer; VGG16 without Z):
random tensors of those shapes at full size, the ``module.`` prefix of
nn.DataParallel and the outer keys. It is evaluated on a tiny test set, and the
network it loads into is checked against a forward pass written here from the
file's tensors alone (float64, F.conv2d, BatchNorm with running statistics): the
mean network ``sign(M) * Alpha``. The ResNet18 forward pass has no activation after
the stem, as the authors' network (the golden data of ``test_fidelity.py`` from
their code is what settles it).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import DATASETS, normalize
from data.synthetic import structured_images, write_cifar
from models import build_model, released as released_layout
from optim import VISPA
from utils import files
from helpers import REPO, assert_clear_error, key_list, run_main, run_results, run_script

SCRIPTS = {"resnet18": "evaluate_cifar100_resnet18_1W32A.sh", "vgg16": "evaluate_cifar100_vgg16_1W32A.sh"}
RELEASED = {"resnet18": "resnet18_1w32A_model_best.pth.tar", "vgg16": "vgg16_1w32A_model_best.pth.tar"}
MEAN, STD, EPS = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1e-5  # from the specification
NUM_TEST, NUM_RIGHT = 20, 13  # test images; how many of them get the mean network's class as label


# the layouts of the authors' files: today's code, the code of 2024 (.sample), VGG16 without Z
LAYOUTS = {
    ("resnet18", "head"): "resnet18_1w32a_cifar100_state_dict_keys.txt",
    ("vgg16", "head"): "vgg16_1w32a_cifar100_state_dict_keys.txt",
    ("resnet18", "sample"): "resnet18_1w32a_cifar100_state_dict_keys_code-of-2024-12-31.txt",
    ("vgg16", "sample"): "vgg16_1w32a_cifar100_state_dict_keys_code-of-2024-06-05.txt",
    ("vgg16", "without Z"): "vgg16_1w32a_cifar100_state_dict_keys_code-of-2024-12-31.txt",
}


def released_keys(model, layout="head"):
    """[(key, shape, dtype)] of the released checkpoint of ``model`` in ``layout``."""
    return key_list(LAYOUTS[model, layout])


def random_tensor(key, shape, dtype, generator, random_Z=True):
    """A random value of the right kind for each key (BatchNorm variances positive,
    scales near one, counters integers)."""
    leaf = key.rsplit(".", 1)[1]
    if dtype == torch.int64:
        return torch.randint(1, 1000, shape, generator=generator)
    uniform = lambda low, high: low + (high - low) * torch.rand(shape, generator=generator)
    if leaf == "Alpha":  # per output channel; released_checkpoint divides by the fan-in
        return uniform(0.5, 1.5)
    if leaf == "running_var":
        return uniform(0.5, 2.0)
    if leaf in ("running_mean", "bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    if leaf == "weight" and len(shape) == 1:  # BatchNorm scale
        return uniform(0.5, 1.5)
    if leaf == "weight":  # full-precision conv / linear
        return torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:]))
    if leaf == "sample":  # unused zeros in the authors' files
        return torch.zeros(shape)
    if leaf == "Z" and not random_Z:  # a zero view with stride 0: a few bytes on disk
        return torch.zeros(1).expand(*shape)
    return torch.randn(shape, generator=generator)  # M, Z


def released_checkpoint(model, layout="head", seed=0, random_Z=True):
    """A file in the released ``layout``; with ``random_Z=False`` its factors Z are zero
    views that cost no disk (and make every sample the mean network)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {key: random_tensor(key, shape, dtype, generator, random_Z=random_Z)
                  for key, shape, dtype in released_keys(model, layout)}
    # Alpha ~ sqrt(2 / fan_in): the activations stay of order one through the network,
    # where float32 and float64 agree closely
    for key in state_dict:
        if key.endswith(".Alpha"):
            fan_in = math.prod(state_dict[key[:-len("Alpha")] + "M"].shape[1:])
            state_dict[key] *= math.sqrt(2 / fan_in)
    return {"epoch": 500, "model": f"{model}_1w32a", "config": {"num_classes": 100},
            "state_dict": state_dict, "best_prec1": 77.0,
            "fp_regime": {"0": {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9}}}


# ---- the forward pass of the mean network, from the file's tensors alone -----------------

def batch_norm(x, t, name, affine=True):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - t[f"{name}.running_mean"].view(shape)) / torch.sqrt(t[f"{name}.running_var"].view(shape) + EPS)
    return y * t[f"{name}.weight"].view(shape) + t[f"{name}.bias"].view(shape) if affine else y


def binary_conv(x, t, name, stride=1, padding=1):
    weight = torch.sign(t[f"{name}.M"]) * t[f"{name}.Alpha"].reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, stride=stride, padding=padding)


def resnet18_reference(x, t):
    out = batch_norm(F.conv2d(x, t["conv1.weight"], padding=1), t, "bn1")  # no activation
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            h = F.relu(batch_norm(binary_conv(out, t, f"{p}.conv1", stride), t, f"{p}.bn1"))
            h = batch_norm(binary_conv(h, t, f"{p}.conv2"), t, f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in t:
                shortcut = batch_norm(F.conv2d(out, t[f"{p}.shortcut.0.weight"], stride=stride),
                                      t, f"{p}.shortcut.1", affine=False)
            else:
                shortcut = out
            out = F.relu(h + shortcut)
    out = batch_norm(F.avg_pool2d(out, 4).flatten(1), t, "bn2")
    return out @ t["linear.weight"].T + t["linear.bias"]


def vgg16_reference(x, t):
    for i in range(1, 14):
        x = binary_conv(x, t, f"conv{i}")
        if i in (2, 4, 7, 10, 13):
            x = F.max_pool2d(x, 2)
        x = F.relu(batch_norm(x, t, f"bn{i}", affine=False))
    x = x.flatten(1)
    for i in (14, 15, 16):
        weight = torch.sign(t[f"fc{i}.M"]).flatten(1) * t[f"fc{i}.Alpha"].reshape(-1, 1)
        x = batch_norm(x @ weight.T, t, f"bn{i}", affine=False)
        x = F.relu(x) if i < 16 else x
    return x


def reference_logits(model, state_dict, images):
    """float64 logits of the mean network for uint8 images (N, 3, 32, 32)."""
    t = {k[len("module."):]: v.double() for k, v in state_dict.items() if not k.endswith((".Z", ".sample"))}
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).double() / 255 - mean) / std
    with torch.no_grad():
        return (resnet18_reference if model == "resnet18" else vgg16_reference)(x, t)


# ---- fixtures ----------------------------------------------------------------------------

def make_released(folder, model, layout, random_Z):
    """A released-layout file in ``folder``, the float64 reference logits of its mean
    network on NUM_TEST images, and a data root whose test labels are the reference's
    class for the NUM_RIGHT images with the clearest margin and its least likely class
    for the others."""
    ckpt = released_checkpoint(model, layout, random_Z=random_Z)
    path = folder / RELEASED[model]
    torch.save(ckpt, path)
    images = np.random.default_rng(1).integers(0, 256, (NUM_TEST, 3, 32, 32), dtype=np.uint8)
    logits = reference_logits(model, ckpt["state_dict"], images)
    top2 = logits.topk(2, dim=1).values
    clearest = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:NUM_RIGHT]
    labels = logits.argmin(1)
    labels[clearest] = logits.argmax(1)[clearest]
    data_root = folder / "data"
    write_cifar(str(data_root), "cifar100", images[:2], labels[:2].numpy(), images, labels.numpy())
    small = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(".Z")}
    return dict(model=model, layout=layout, path=path, folder=folder, images=images, logits=logits,
                data_root=str(data_root), state_dict=small)


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=[" ".join(k) for k in LAYOUTS])
def released(request, tmp_path_factory):
    """A file in each released layout at full size; today's layout with random factors Z
    (hundreds of megabytes, removed afterwards), the others with zero ones."""
    model, layout = request.param
    folder = tmp_path_factory.mktemp(f"released-{model}-{layout.replace(' ', '-')}")
    made = make_released(folder, model, layout, random_Z=layout == "head")
    yield made
    made["path"].unlink()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """``heads(model)``: today's layout with zero factors, the file the tests below edit
    (made once per module). The refusals do not depend on the network: each is tried on
    one of the two, the classifier's on both."""
    made = {}

    def get(model):
        if model not in made:
            made[model] = make_released(tmp_path_factory.mktemp(f"head-{model}"), model, "head", random_Z=False)
        return made[model]
    return get


def evaluate(model, *args, data_root, L=2):
    return run_script(SCRIPTS[model], *args, DATA_ROOT=data_root, L=L, GPU="cpu", timeout=600)


def results_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("Test: ")]
    assert len(lines) == 1, stdout
    return lines[0]


# ---- the released layout -----------------------------------------------------------------

def test_released_layout_evaluates_and_mean_network_matches_the_file(released):
    model = released["model"]
    result = evaluate(model, str(released["path"]), data_root=released["data_root"])
    assert result.returncode == 0, result.stdout + result.stderr
    line = results_line(result.stdout)
    assert "(L=2)" in line and "loss" in line and "Prec@5" in line
    assert line.endswith(f"mean network Prec@1 {100 * NUM_RIGHT / NUM_TEST:.2f}")
    assert "released checkpoint, epoch 500" in result.stdout
    K = 0 if released["layout"] == "without Z" else 8  # read from the file
    assert f"({model}, cifar100, K={K};" in result.stdout
    if released["layout"] == "sample":
        assert "its 16 unused .sample tensors (zeros) were left out" in result.stdout
    if released["layout"] == "without Z":
        assert "K=0, a deterministic network" in result.stdout
        # every sample is the mean network
        assert f"Prec@1 {100 * NUM_RIGHT / NUM_TEST:.2f}  Prec@5" in line


def test_released_layout_logits_equal_the_direct_computation(released):
    """The network built from the file computes, in mean mode, the reference forward
    pass of the file's tensors; every M and Z of the file is the distribution's."""
    model = build_model(released["model"], num_classes=100)
    ckpt = files.load(str(released["path"]))
    K = released_layout.rank_of(ckpt["state_dict"])
    opt = VISPA(model.parameters(), lr=0.1, K=K)
    found = released_layout.from_released(ckpt["state_dict"], model)
    model.load_state_dict(found.model_state)
    params = dict(model.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)
    for key, value in ckpt["state_dict"].items():  # every tensor of the file is in use
        name = key[len("module."):]
        if name.endswith((".M", ".Z")):
            layer_weight = params[name.rsplit(".", 1)[0] + ".weight"]
            assert torch.equal(opt.state[layer_weight][name[-1]], value), key
    assert found.dropped == ([k for k in ckpt["state_dict"] if k.endswith(".sample")])
    assert len(found.dropped) == (16 if released["layout"] == "sample" else 0)
    del ckpt
    model.eval()
    with torch.no_grad(), opt.mean_params():
        logits = model(normalize(torch.from_numpy(released["images"]), MEAN, STD)).double()
    expected = released["logits"]
    assert logits.shape == expected.shape == (NUM_TEST, 100)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def edited_file(head, name, edit):
    """A copy of a released file (today's layout, zero factors) with ``edit`` applied to
    its state_dict."""
    sd = {k: v for k, v in head["state_dict"].items()}
    for key, _, _ in released_keys(head["model"]):
        if key.endswith(".Z"):
            sd[key] = torch.zeros(1).expand(*(8,) + sd[key[:-1] + "M"].shape)
    edit(sd)
    path = head["folder"] / name
    torch.save({"epoch": 500, "model": head["model"], "config": {}, "state_dict": sd,
                "best_prec1": 77.0, "fp_regime": {}}, path)
    return str(path)


def test_released_layout_with_a_renamed_key_is_refused(heads):
    head = heads("resnet18")
    first_m = next(k for k in head["state_dict"] if k.endswith(".M"))
    renamed = first_m[:-1] + "mean"
    path = edited_file(head, "renamed.pth.tar", lambda sd: sd.update({renamed: sd.pop(first_m)}))
    assert_clear_error(evaluate(head["model"], path, data_root=head["data_root"]),
                       f"missing: {first_m}", f"unexpected: {renamed}")


def test_K_is_read_from_the_file_and_a_contradicting_K_is_refused(heads):
    head = heads("vgg16")
    def rank_4(sd):
        for key in [k for k in sd if k.endswith(".Z")]:
            sd[key] = torch.zeros(1).expand(4, *sd[key].shape[1:])
    path = edited_file(head, "k4.pth.tar", rank_4)
    result = evaluate(head["model"], path, data_root=head["data_root"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({head['model']}, cifar100, K=4;" in result.stdout
    contradicted = run_main("--evaluate", path, "--model", head["model"], "--dataset", "cifar100",
                            "-K", "8", "-L", "2", "--data_root", head["data_root"], "--gpus", "cpu")
    assert_clear_error(contradicted, "holds K=4 (the first dimension of its Z), not the -K 8 asked for")


def test_Z_tensors_of_different_ranks_are_refused(heads):
    head = heads("resnet18")
    def mixed(sd):
        first = next(k for k in sd if k.endswith(".Z"))
        sd[first] = torch.zeros(1).expand(4, *sd[first].shape[1:])
    path = edited_file(head, "mixed.pth.tar", mixed)
    assert_clear_error(evaluate(head["model"], path, data_root=head["data_root"]),
                       "its Z tensors have different ranks: [4, 8]")


def test_a_sample_tensor_that_is_not_zero_is_refused(heads):
    head = heads("vgg16")
    layers = [k[:-len(".M")] for k in head["state_dict"] if k.endswith(".M")]

    def with_samples(sd):
        sd.update({f"{layer}.sample": torch.zeros(1, 8) for layer in layers})
        sd[f"{layers[3]}.sample"][0, 2] = 0.5
    path = edited_file(head, "sample.pth.tar", with_samples)
    assert_clear_error(evaluate(head["model"], path, data_root=head["data_root"]),
                       f"{layers[3]}.sample is not zero: the authors' .sample tensors are unused zeros")


@pytest.mark.parametrize("model", ["resnet18", "vgg16"])
def test_released_layout_with_another_number_of_classes_is_refused(heads, model):
    """The classifier's weight with 10 rows (the rest of the file unchanged)."""
    head = heads(model)
    classifier = "module.linear.weight" if head["model"] == "resnet18" else "module.fc16.M"
    path = edited_file(head, "c10.pth.tar", lambda sd: sd.update({classifier: sd[classifier][:10]}))
    assert_clear_error(evaluate(head["model"], path, data_root=head["data_root"]),
                       "shape mismatch", f"{classifier} (10, 512")


# ---- files that are not plain data, missing files ----------------------------------------

class RunsCode:
    """Unpickling this calls open(path, "w"): code a checkpoint must never run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickled_object_is_refused_and_never_run(tmp_path, cifar100_root):
    model = "vgg16"
    marker = tmp_path / "this-file-must-not-appear"
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {}, "fp_regime": RunsCode(str(marker))}, path)
    data_root = cifar100_root
    assert_clear_error(evaluate(model, str(path), data_root=data_root),
                       f"refusing to load {path}", "objects other than tensors and plain data")
    assert not marker.exists()


@pytest.mark.parametrize("state_dict", [{"module.conv1.weight": "not a tensor"}, [1, 2, 3]])
def test_a_state_dict_that_is_not_named_tensors_is_refused(tmp_path, state_dict, cifar100_root):
    path = tmp_path / "odd.pth.tar"
    torch.save({"epoch": 1, "state_dict": state_dict}, path)
    data_root = cifar100_root
    assert_clear_error(evaluate("resnet18", str(path), data_root=data_root),
                       f"{path}: its 'state_dict' is not a dict of named tensors")


def test_a_truncated_file_is_refused(tmp_path, cifar100_root):
    path = tmp_path / "truncated.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module.conv1.M": torch.randn(64, 3, 3, 3)}}, path)
    path.write_bytes(path.read_bytes()[:-200])
    data_root = cifar100_root
    assert_clear_error(evaluate("vgg16", str(path), data_root=data_root),
                       f"cannot read {path}: truncated, corrupt, or not a checkpoint")


@pytest.mark.parametrize("model", ["resnet18", "vgg16"])
def test_missing_released_checkpoint_says_where_to_get_it(tmp_path, model):
    if os.path.exists(os.path.join(REPO, "pretrained", RELEASED[model])):
        pytest.skip("the released checkpoint is present in pretrained/")
    result = evaluate(model, data_root=tmp_path)  # the default path
    assert_clear_error(result, f"{REPO}/pretrained/{RELEASED[model]} not found",
                       "the authors' release of the paper's code",
                       "resnet18_1w32A_model_best.pth.tar and vgg16_1w32A_model_best.pth.tar",
                       f"in {REPO}/pretrained/")
    other = evaluate(model, str(tmp_path / "nowhere.pth.tar"), data_root=tmp_path)
    assert_clear_error(other, f"{tmp_path}/nowhere.pth.tar not found")


# ---- this project's checkpoints ----------------------------------------------------------

def test_own_checkpoint_evaluates_to_its_logged_mean_network(tmp_path, cifar100_root):
    """A checkpoint written by main.py: without DATA_ROOT the script reads the dataset
    where the run was trained, and at the log's L it reports the L-sample and mean-network
    accuracies of the run's metrics for the best epoch (the evaluation draws come from the
    run's seed and the epoch). The network is the file's (here a narrow one); the script's
    model must agree."""
    data_root = cifar100_root
    run = run_main("--gpus", "cpu", "--model", "resnet18", "--width", "4", "--epochs", "2", "-b", "64",
                   "-L", "2", "-K", "8", "--warmup_epochs", "1", "--seed", "3", "--data_root", data_root,
                   "--results_dir", str(tmp_path), "--save", "run")
    assert run.returncode == 0, run.stderr
    epochs, status = run_results(tmp_path, "run")
    best_epoch = status.best_epoch
    result = evaluate("resnet18", str(tmp_path / "run" / "model_best.pth.tar"), data_root="", L=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(resnet18, cifar100, K=8; epoch" in result.stdout
    line = results_line(result.stdout)
    assert f"Prec@1 {epochs[best_epoch][0]:.2f}" in line and "(L=2)" in line
    assert line.endswith(f"mean network Prec@1 {epochs[best_epoch][1]:.2f}")

    other = evaluate("vgg16", str(tmp_path / "run" / "model_best.pth.tar"), data_root=data_root, L=3)
    assert_clear_error(other, "holds another network than the one asked for", "model=vgg16 (checkpoint: resnet18)")


# ---- the authors' fully binary (1W1A) CIFAR-10 networks -------------------------------------------

SCRIPTS_1W1A = {"resnet18_1w1a": ("evaluation/evaluate_cifar10_resnet18_1W1A.sh", "resnet18_1w1a_cifar10"),
                "vgg_small": ("evaluation/evaluate_cifar10_vgg-small_1W1A.sh", "vgg-small_1w1a_cifar10")}


@pytest.fixture(scope="module")
def small_cifar10(tmp_path_factory):
    """20 test images: a full-size network evaluates them in a moment."""
    root = tmp_path_factory.mktemp("small-cifar10")
    write_cifar(str(root), "cifar10", *structured_images(10, NUM_TEST, 10, seed=7))
    return str(root)


@pytest.mark.parametrize("layout", ["head", "sample"])
@pytest.mark.parametrize("model", list(SCRIPTS_1W1A))
def test_the_authors_1w1a_files_evaluate_in_both_layouts(model, layout, tmp_path, small_cifar10):
    """A full-size file in the authors' 1W1A layout (and with the .sample tensors of their
    code of 2024) through its evaluate script: K read from the file, and the mean
    network's top-1 that of the network the file describes."""
    script, keys = SCRIPTS_1W1A[model]
    keys = key_list(f"{keys}_state_dict_keys.txt", samples=layout == "sample")
    generator = torch.Generator().manual_seed(5)
    state_dict = {key: random_tensor(key, shape, dtype, generator, random_Z=False) for key, shape, dtype in keys}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 600, "model": model, "config": "", "state_dict": state_dict, "best_prec1": 92.7,
                "fp_regime": {}}, path)
    result = run_script(script, str(path), DATA_ROOT=small_cifar10, L=2, GPU="cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({model}, cifar10, K=4; released checkpoint, epoch 600" in result.stdout
    samples = sum(key.endswith(".sample") for key in state_dict)  # 16 in ResNet18, 5 in VGG-Small
    assert (f"its {samples} unused .sample tensors (zeros) were left out" in result.stdout) == (layout == "sample")

    network = build_model(model, num_classes=10)
    opt = VISPA(network.parameters(), lr=0.1, K=4)
    found = released_layout.from_released(state_dict, network)
    network.load_state_dict(found.model_state)
    params = dict(network.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)
    images, labels = DATASETS["cifar10"].read(small_cifar10, "test")
    network.eval()
    with torch.no_grad():
        top1 = (network(normalize(images, MEAN, STD)).argmax(1) == labels).double().mean().item() * 100
    assert results_line(result.stdout).endswith(f"mean network Prec@1 {top1:.2f}")
