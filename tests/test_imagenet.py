"""ImageNet end to end on the CPU: the authors' recipes, a narrow network trained from
generated JPEG folders by main.py, its evaluation on one process and on two ranks, and
the authors' ImageNet files (full size) through the evaluate scripts."""
import math
import os

import pytest
import torch

import config
from data.synthetic import write_image_folders
from data import DATASETS
from helpers import assert_clear_error, key_list, run_main, run_results, run_script
from models import build_model, released
from optim import VISPA
from training import peak_lr
from utils.distributed import World


@pytest.mark.parametrize("recipe, model, K, lr, wd, epochs, peak", [
    ("alexnet_1w1a_imagenet", "alexnet_1w1a", 2, 0.5, 1e-5, 100, 2.0),
    ("alexnet_1w32a_imagenet", "alexnet_1w32a", 4, 0.1, 5e-5, 100, 0.4),
    ("birealnet18_1w1a_imagenet", "birealnet18", 2, 0.5, 1e-5, 200, 2.0),
    ("resnet18_1w32a_imagenet", "resnet18_imagenet", 4, 0.1, 5e-5, 200, 0.4),
])
def test_the_imagenet_recipes_are_the_authors(recipe, model, K, lr, wd, epochs, peak):
    """docs/recipes.md: 256 images per GPU on 4 GPUs, the lr multiplied by 256 x 4 / 256
    before the optimizer and the schedule see it (the effective peak), S = 100, L = 40."""
    r = config.RECIPES[recipe]
    assert (r.model, r.dataset, r.K, r.lr, r.wd, r.epochs, r.batch_size, r.scale, r.L, r.scale_lr) == \
        (model, "imagenet", K, lr, wd, epochs, 256, 100.0, 40, True)
    assert peak_lr(r, World(0, 4)) == pytest.approx(peak)
    assert peak_lr(r, World()) == pytest.approx(peak / 4)  # one GPU: 256 / 256


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return str(write_image_folders(str(root), classes=4, per_class=(10, 3), size=(60, 80), seed=2))


def test_a_narrow_network_trains_from_the_folders_and_evaluates_on_one_or_two_ranks(imagenet, tmp_path):
    results = tmp_path / "results"
    run = run_main("--recipe", "resnet18_1w32a_imagenet", "--width", 4, "--epochs", 1, "--warmup_epochs", 1,
                   "-b", 20, "-L", 1,
                   "-j", 0, "--eval-batch-size", 5, "--gpus", "cpu", "--seed", 1, "--data_root", imagenet,
                   "--results_dir", results, "--save", "imagenet")
    assert run.returncode == 0, run.stderr
    epochs, status = run_results(results, "imagenet")
    log = open(results / "imagenet.txt").read()
    assert status.finished and "2 training steps per epoch" in log
    # one rank, batch 20: what --scale-lr made of the lr, and that the authors had 4 ranks
    assert ("Peak lr 0.0078125 = lr 0.1 x batch 20 x 1 rank(s) / 256; the authors' ImageNet runs have 4 "
            "(torchrun --nproc_per_node 4; on fewer GPUs, --virtual-ranks makes up the 4)") in log
    best = results / "imagenet" / "model_best.pth.tar"
    one = run_script("evaluation/evaluate_imagenet_resnet18_1W32A.sh", best, DATA_ROOT=imagenet, L=1, GPU="cpu")
    two = run_script("evaluation/evaluate_imagenet_resnet18_1W32A.sh", best, DATA_ROOT=imagenet, L=1, GPU="cpu",
                     NPROC=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    tests = [[line for line in r.stdout.splitlines() if line.startswith("Test: ")] for r in (one, two)]
    assert len(tests[0]) == 1 and len(tests[1]) == 1, two.stdout  # rank 0 alone prints
    mean_net = lambda line: line.rsplit("mean network Prec@1 ", 1)[1]
    assert mean_net(tests[0][0]) == mean_net(tests[1][0]) == f"{epochs[1][1]:.2f}"  # every image once


def authors_file(path, keys):
    """A full-size file in the authors' ImageNet layout ({epoch, arch, state_dict,
    best_prec1, optimizer}) with random values and zero factors Z (no disk)."""
    generator = torch.Generator().manual_seed(3)
    state = {}
    for key, shape, dtype in keys:
        leaf = key.rsplit(".", 1)[1]
        if dtype == torch.int64:
            state[key] = torch.randint(1, 100, shape, generator=generator)
        elif leaf in ("Z", "sample"):
            state[key] = torch.zeros(1).expand(*shape) if leaf == "Z" else torch.zeros(shape)
        elif leaf == "running_var" or (leaf == "weight" and len(shape) == 1):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif leaf in ("weight",) and len(shape) > 1:
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    torch.save({"epoch": 200, "arch": "x", "state_dict": state, "best_prec1": 60.0, "optimizer": {}}, path)
    return state


@pytest.mark.parametrize("model, keys, script, K", [
    ("birealnet18", "birealnet18_1w1a_imagenet", "evaluation/evaluate_imagenet_birealnet_1W1A.sh", 2),
    ("resnet18_imagenet", "resnet18_1w32a_imagenet", "evaluation/evaluate_imagenet_resnet18_1W32A.sh", 4),
])
@pytest.mark.parametrize("layout", ["head", "sample"])
def test_the_authors_imagenet_files_evaluate_through_their_scripts(imagenet, tmp_path, model, keys, script, K,
                                                                   layout):
    path = tmp_path / "model_best.pth.tar"
    state = authors_file(path, key_list(f"{keys}_state_dict_keys.txt", samples=layout == "sample"))
    result = run_script(script, path, DATA_ROOT=imagenet, L=1, GPU="cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({model}, imagenet, K={K}; released checkpoint, epoch 200" in result.stdout
    network = build_model(model, 1000)
    opt = VISPA(network.parameters(), lr=0.1, K=K)
    found = released.from_released(state, network)
    network.load_state_dict(found.model_state)
    params = dict(network.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)
    network.eval()
    cfg = config.Config(model=model, dataset="imagenet", loader="torchvision", workers=0, eval_batch_size=12)
    hits = total = 0
    with torch.no_grad():
        for images, labels in DATASETS["imagenet"].test_loader(cfg, imagenet, World(), torch.device("cpu")):
            hits += (network(images).argmax(1) == labels).sum().item()
            total += len(labels)
    assert total == 12
    test_line = next(line for line in result.stdout.splitlines() if line.startswith("Test: "))
    assert test_line.endswith(f"mean network Prec@1 {100 * hits / total:.2f}")


def test_without_data_root_imagenet_is_read_from_datasets_imagenet(tmp_path):
    """main.py's default folder for ImageNet is the one the README and the scripts name,
    ./datasets/imagenet (the other datasets' default is ./datasets)."""
    run = run_main("--recipe", "resnet18_1w32a_imagenet", "--gpus", "cpu", "--results_dir", tmp_path, "--save", "x")
    assert_clear_error(run, "ImageNet at ./datasets/imagenet is not usable")
    assert not os.path.exists(tmp_path / "x")
