"""factory.py in process: a file opened once and told apart by its content (one of our
checkpoints, an exported network, one of the authors' released layouts, and what is none
of them), the settings typed beside it (refused where they contradict the file, taken
where they are the evaluation's), the network and optimizer of each --method, the memory
check, and where a dataset is read from."""
import shutil

import pytest
import torch
import torch.nn as nn

import checkpoint
import factory
from checkpoint import Checkpoint, CheckpointError
from config import Config, UsageError
from data import DATASETS, DatasetError
from factory import CHECKPOINT, EVALUATION_SETTINGS, EXPORTED, RELEASED, DataFolder
from models import BinaryLinear, build_model, is_binary, packed, released
from optim import STE, VISPA, BayesBiNN
from utils.distributed import World
from utils.run_dir import CSV_FIELDS

CPU = torch.device("cpu")
# The network in the files: a ResNet18 of width 2 for CIFAR-10 (16 binary convolutions), K=2.
TRAINED = Config(model="resnet18", dataset="cifar10", width=2, K=2, L=3, eval_batch_size=50, epochs=3,
                 warmup_epochs=1, seed=5, lr=0.1)
BINARY_CONVS = 16


def binary_names(model):
    return [name for name, p in model.named_parameters() if is_binary(p)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind, holding the same network: our checkpoint (epoch 1 of run
    "r18", trained on /data/cifar), its export, and the authors' layout of a K=3 VISPA."""
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model, opt = factory.build(TRAINED, CPU)
    state = Checkpoint(config=TRAINED, run="r18", run_id="a1b2c3", epoch=1, model=model.state_dict(),
                       optimizer=opt.state_dict(), best_prec1=10.0, best_epoch=1,
                       history=[{k: 1 if k == "epoch" else 0.5 for k in CSV_FIELDS}], ranks=[{}], log_offset=0,
                       data_root="/data/cifar", threads=1)
    ours = str(folder / "checkpoint.pth.tar")
    checkpoint.write(state.to_file(), ours)

    means = {name: opt.state[p]["M"] for name, p in model.named_parameters() if is_binary(p)}
    dataset = DATASETS["cifar10"]
    content = packed.pack(model, means, "resnet18", 2, 10, 32, "cifar10", dataset.mean, dataset.std,
                          "epoch 1 of run r18", {"source": "recomputed", "images": 64}, "/data/cifar")
    exported = str(folder / "model.bnn")
    packed.save(content, exported)

    theirs = build_model("resnet18", 10, 2)
    vispa = VISPA(theirs.parameters(), lr=0.1, K=3, seed=0)
    distributions = {name: (vispa.state[p]["M"], vispa.state[p]["Z"]) for name, p in theirs.named_parameters()
                     if is_binary(p)}
    released_path = str(folder / "released.pth.tar")
    torch.save({"epoch": 500, "best_prec1": 70.5, "state_dict": released.to_released(theirs, distributions)},
               released_path)
    return {"ours": ours, "state": state, "model": model, "exported": exported, "released": released_path,
            "distributions": distributions, "folder": folder}


ASKED = Config()  # the command line's defaults


def opened(path, asked=ASKED, typed=()):
    return factory.open_network(str(path), asked, set(typed), CPU)


def refused(path, asked=ASKED, typed=()):
    with pytest.raises(CheckpointError) as error:
        opened(path, asked, typed)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ---- our checkpoint ---------------------------------------------------------------------------------

def test_our_checkpoint_opens_with_its_network_distribution_and_origin(files):
    loaded = opened(files["ours"])
    assert loaded.kind == CHECKPOINT
    assert isinstance(loaded.opt, VISPA)
    assert (loaded.cfg.model, loaded.cfg.dataset, loaded.cfg.width, loaded.cfg.K) == ("resnet18", "cifar10", 2, 2)
    assert (loaded.epoch, loaded.trained_on, loaded.source) == (1, "/data/cifar", "epoch 1 of run r18")
    saved = files["state"].optimizer["state"]
    for index, (name, p) in enumerate(loaded.model.named_parameters()):
        if is_binary(p):
            assert torch.equal(loaded.opt.state[p]["M"], saved[index]["M"])
            assert torch.equal(loaded.opt.state[p]["Z"], saved[index]["Z"])
            assert torch.equal(p, torch.sign(saved[index]["M"]))  # the layer holds the mean network
    for key, value in files["state"].model.items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_the_settings_not_typed_are_the_files_and_L_is_the_one_asked_for(files):
    loaded = opened(files["ours"], Config(width=64, K=8, L=40, eval_batch_size=1000))
    assert (loaded.cfg.width, loaded.cfg.K, loaded.cfg.eval_batch_size, loaded.cfg.seed) == (2, 2, 50, 5)
    assert loaded.cfg.L == 40  # the command line's -L, typed or its default: the file's was 3


def test_the_evaluation_settings_typed_replace_the_files(files):
    asked = Config(L=7, bf16=True, loader="torchvision", workers=0, eval_batch_size=13, batch_size=8,
                   recalibrate=100)
    loaded = opened(files["ours"], asked, EVALUATION_SETTINGS)
    assert set(EVALUATION_SETTINGS) == {"L", "bf16", "loader", "workers", "eval_batch_size", "batch_size",
                                        "recalibrate"}
    assert {key: getattr(loaded.cfg, key) for key in EVALUATION_SETTINGS} == {
        "L": 7, "bf16": True, "loader": "torchvision", "workers": 0, "eval_batch_size": 13, "batch_size": 8,
        "recalibrate": 100}
    assert (loaded.cfg.model, loaded.cfg.width, loaded.cfg.K, loaded.cfg.seed) == ("resnet18", 2, 2, 5)


def test_a_typed_setting_that_is_neither_the_networks_nor_the_evaluations_leaves_the_files(files):
    loaded = opened(files["ours"], Config(lr=0.5, seed=9), {"lr", "seed"})
    assert (loaded.cfg.lr, loaded.cfg.seed) == (0.1, 5)


@pytest.mark.parametrize("asked,typed,expected", [
    (Config(width=4), {"width"}, "width=4 (checkpoint: 2)"),
    (Config(K=8), {"K"}, "K=8 (checkpoint: 2)"),
    (Config(model="vgg16", dataset="cifar10"), {"model"}, "model=vgg16 (checkpoint: resnet18)"),
    (Config(dataset="cifar100"), {"dataset"}, "dataset=cifar100 (checkpoint: cifar10)"),
    (Config(width=4, K=8), {"width", "K"}, "width=4 (checkpoint: 2), K=8 (checkpoint: 2)"),
])
def test_typed_settings_that_contradict_our_checkpoint_are_refused(files, asked, typed, expected):
    message = refused(files["ours"], asked, typed)
    assert message == f"{files['ours']} holds another network than the one asked for: {expected}"


def test_typed_settings_that_agree_with_the_file_are_accepted(files):
    loaded = opened(files["ours"], Config(model="resnet18", dataset="cifar10", width=2, K=2),
                    {"model", "dataset", "width", "K"})
    assert loaded.kind == CHECKPOINT


def test_a_checkpoint_that_does_not_fit_its_own_settings_is_refused(files, tmp_path):
    content = dict(files["state"].to_file(), config=dict(TRAINED.to_dict(), K=4))  # K=2 tensors
    path = str(tmp_path / "other-K-inside.pth.tar")
    checkpoint.write(content, path)
    assert refused(path).startswith(f"{path} does not fit this network: ")


# ---- an exported network ------------------------------------------------------------------------

def test_an_exported_network_opens_as_the_mean_network_without_an_optimizer(files):
    loaded = opened(files["exported"])
    assert loaded.kind == EXPORTED and loaded.opt is None
    assert (loaded.cfg.model, loaded.cfg.dataset, loaded.cfg.width) == ("resnet18", "cifar10", 2)
    assert loaded.statistics == {"source": "recomputed", "images": 64}
    assert loaded.trained_on == "/data/cifar"
    assert loaded.source == "the exported network sign(M) of epoch 1 of run r18"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    files["model"].eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), files["model"](x))


def test_an_exported_network_takes_only_the_evaluation_settings_typed(files):
    loaded = opened(files["exported"], Config(eval_batch_size=13, L=7, lr=0.5), {"eval_batch_size", "lr"})
    assert (loaded.cfg.eval_batch_size, loaded.cfg.L, loaded.cfg.lr) == (13, Config().L, Config().lr)


@pytest.mark.parametrize("asked,typed,expected", [
    (Config(width=4), {"width"}, "width=4 (checkpoint: 2)"),
    (Config(model="vgg16", dataset="cifar10"), {"model"}, "model=vgg16 (checkpoint: resnet18)"),
    (Config(dataset="cifar100"), {"dataset"}, "dataset=cifar100 (checkpoint: cifar10)"),
])
def test_typed_settings_that_contradict_an_export_are_refused(files, asked, typed, expected):
    message = refused(files["exported"], asked, typed)
    assert message == f"{files['exported']} is another network than the one asked for: {expected}"


def test_an_export_for_a_dataset_with_another_number_of_classes_is_refused(tmp_path):
    model = build_model("resnet18", 7, 2)
    means = {name: p.detach() for name, p in model.named_parameters() if is_binary(p)}
    path = tmp_path / "seven.bnn"
    packed.save(packed.pack(model, means, "resnet18", 2, 7, 32, "cifar10", (0.5,) * 3, (0.25,) * 3, "hand"), str(path))
    assert "is a network of 7 classes for the dataset 'cifar10', which this program does not know with that " \
           "many classes" in refused(path)


# ---- the authors' released layouts --------------------------------------------------------------

THEIR_NETWORK = Config(model="resnet18", dataset="cifar10", width=2)


def test_a_released_file_opens_with_K_read_from_its_factors(files):
    loaded = opened(files["released"], THEIR_NETWORK, {"model", "dataset", "width"})  # -K not typed: 8 asked
    assert loaded.kind == RELEASED and isinstance(loaded.opt, VISPA)
    assert loaded.cfg.K == 3 and loaded.opt.param_groups[0]["K"] == 3
    assert loaded.source == "released checkpoint, epoch 500, best_prec1 70.5"
    assert (loaded.epoch, loaded.trained_on, loaded.note) == (0, None, "")
    for name, p in loaded.model.named_parameters():
        if is_binary(p):
            M, Z = files["distributions"][name]
            assert torch.equal(loaded.opt.state[p]["M"], M) and torch.equal(loaded.opt.state[p]["Z"], Z)
            assert torch.equal(p, torch.sign(M))


def test_a_released_file_refuses_a_typed_K_other_than_its_own(files):
    message = refused(files["released"], Config(model="resnet18", dataset="cifar10", width=2, K=5), {"K"})
    assert "holds K=3 (the first dimension of its Z), not the -K 5 asked for; leave -K out" in message
    assert opened(files["released"], Config(model="resnet18", dataset="cifar10", width=2, K=3), {"K"}).cfg.K == 3


def test_a_released_file_is_read_as_the_network_asked_for(files):
    """--model, --dataset and --width name the network: another one does not fit the file."""
    message = refused(files["released"], Config(model="resnet18", dataset="cifar10", width=4))  # not typed
    assert message.startswith(f"{files['released']}: it does not match the network")


def test_the_2024_layout_drops_its_zero_samples_and_says_so(tmp_path):
    network = build_model("resnet18", 10, 2)
    vispa = VISPA(network.parameters(), lr=0.1, K=3, seed=0)
    distributions = {n: (vispa.state[p]["M"], vispa.state[p]["Z"]) for n, p in network.named_parameters()
                     if is_binary(p)}
    path = tmp_path / "samples.pth.tar"
    torch.save({"epoch": 3, "best_prec1": 1.0, "state_dict": released.to_released(network, distributions, True)},
               path)
    loaded = opened(path, THEIR_NETWORK)
    assert loaded.kind == RELEASED
    assert loaded.source.endswith(f"; its {BINARY_CONVS} unused .sample tensors (zeros) were left out")


def test_the_layout_without_Z_is_the_deterministic_K_0_network(tmp_path):
    network = build_model("resnet18", 10, 2)
    vispa = VISPA(network.parameters(), lr=0.1, K=0, seed=0)
    distributions = {n: (vispa.state[p]["M"], vispa.state[p]["Z"]) for n, p in network.named_parameters()
                     if is_binary(p)}
    path = tmp_path / "without-Z.pth.tar"
    torch.save({"epoch": 500, "state_dict": released.to_released(network, distributions)}, path)
    loaded = opened(path, THEIR_NETWORK)
    assert loaded.kind == RELEASED and loaded.cfg.K == 0
    assert loaded.note.startswith("The file has no Z (the 'without Z' layer): K=0")


# ---- told apart by content ----------------------------------------------------------------------

def test_a_file_is_told_apart_by_its_content_not_its_name(files, tmp_path):
    ours_as_bnn, export_as_tar = tmp_path / "checkpoint.bnn", tmp_path / "model.pth.tar"
    shutil.copyfile(files["ours"], ours_as_bnn)
    shutil.copyfile(files["exported"], export_as_tar)
    assert opened(ours_as_bnn).kind == CHECKPOINT
    assert opened(export_as_tar).kind == EXPORTED


def test_a_bnn_that_is_not_an_export_is_refused(files, tmp_path):
    path = tmp_path / "released.bnn"
    shutil.copyfile(files["released"], path)
    assert refused(path, THEIR_NETWORK) == (
        f"{path} is not an exported binary network (no format 'vispa-binary-network'); export one with "
        f"`python main.py --export CHECKPOINT --out FILE`")


def test_a_file_that_is_neither_ours_nor_released_is_refused_with_its_keys(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weights": torch.ones(2), "epoch": 3}, path)
    assert refused(path) == (f"{path} is neither one of our checkpoints nor in the released layout "
                             f"(no 'state_dict' key; keys: ['epoch', 'weights'])")


@pytest.mark.parametrize("name,what", [("gone.pth.tar", "checkpoint"), ("gone.bnn", "exported network")])
def test_a_missing_file_is_named_as_what_it_should_be(tmp_path, name, what):
    assert refused(tmp_path / name) == f"{what} not found: {tmp_path / name}"


# ---- a Config's network and optimizer -------------------------------------------------------------

SETTINGS = dict(model="resnet18", dataset="cifar10", width=2, K=3, scale=50.0, lr=0.2, momentum=0.8, wd=1e-4)


def test_vispa_trains_the_whole_network_in_one_group_with_its_settings():
    model, opt = factory.build(Config(**SETTINGS), CPU)
    assert type(opt) is VISPA and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert {k: group[k] for k in ("K", "S", "projection", "lr", "momentum", "weight_decay")} == {
        "K": 3, "S": 50.0, "projection": None, "lr": 0.2, "momentum": 0.8, "weight_decay": 1e-4}
    assert "lr_scale" not in group
    assert len(binary_names(model)) == BINARY_CONVS and all(p.device == CPU for p in model.parameters())


def test_vispa_with_the_sphere_projection():
    _, opt = factory.build(Config(**SETTINGS, projection="sphere"), CPU)
    assert opt.param_groups[0]["projection"] == "sphere"


@pytest.mark.parametrize("method,kind", [("bayesbinn", BayesBiNN), ("ste", STE)])
def test_a_rival_puts_the_binary_weights_in_a_group_on_method_lr(method, kind):
    cfg = Config(**SETTINGS, method=method, method_lr=1e-3)
    model, opt = factory.build(cfg, CPU, images_per_epoch=32)
    assert type(opt) is kind and len(opt.param_groups) == 2
    binary, real = opt.param_groups
    assert {id(p) for p in binary["params"]} == {id(p) for p in model.parameters() if is_binary(p)}
    assert {id(p) for p in real["params"]} == {id(p) for p in model.parameters() if not is_binary(p)}
    assert len(binary["params"]) == BINARY_CONVS
    assert binary["lr"] == 1e-3 and binary["lr_scale"] == pytest.approx(1e-3 / 0.2)  # the schedule of --lr, scaled
    assert real["lr"] == 0.2 and "lr_scale" not in real
    for group in (binary, real):
        assert (group["momentum"], group["weight_decay"]) == (0.8, 1e-4)


def test_bayesbinn_counts_every_training_image_ten_times():
    cfg = Config(**SETTINGS, method="bayesbinn", temperature=1e-6)
    _, opt = factory.build(cfg, CPU, images_per_epoch=32)
    assert factory.TRAINSET_SCALE == 10
    assert all(group["train_set_size"] == 320 for group in opt.param_groups)
    assert all(group["temperature"] == 1e-6 for group in opt.param_groups)


def test_evaluation_draws_depend_on_the_seed_the_epoch_and_the_rank():
    _, opt = factory.build(Config(**SETTINGS), CPU)

    def draws(seed, epoch, rank):
        factory.evaluation_draws(opt, Config(**SETTINGS, seed=seed), epoch, rank)
        return torch.randn(4, generator=opt.generator)

    first = draws(1, 3, 0)
    assert torch.equal(draws(1, 3, 0), first)
    assert not any(torch.equal(draws(*other), first) for other in ((2, 3, 0), (1, 4, 0), (1, 3, 1)))


# ---- the memory check ---------------------------------------------------------------------------

def huge():
    """A layer of 2^27 binary weights and 2^12 scales, on the meta device (no memory)."""
    with torch.device("meta"):
        return nn.Sequential(BinaryLinear(2 ** 15, 2 ** 12))


@pytest.mark.parametrize("cfg,gib", [
    # 3 float32 per parameter, and per binary weight 3 (K + 1) for VISPA: 12 x 134,221,824 + 108 x 2^27 bytes
    (Config(K=8), "15.0"),
    # BayesBiNN and the STE: 4 float32 per binary weight: 12 x 134,221,824 + 16 x 2^27 bytes
    (Config(K=8, method="bayesbinn"), "3.5"),
    (Config(K=0), "3.0"),  # 12 x 134,221,824 + 12 x 2^27 bytes
])
def test_check_memory_refuses_with_the_figures(monkeypatch, cfg, gib):
    monkeypatch.setattr(factory, "free_memory", lambda device: 2 ** 30)
    with pytest.raises(UsageError) as error:
        factory.check_memory(huge(), cfg, CPU)
    message = str(error.value)
    assert message.startswith(f"-K {cfg.K}, --width 64: resnet18 (134,221,824 parameters, 134,217,728 of them "
                              f"binary)")
    assert f"needs about {gib} GiB, and cpu has 1.0 GiB free: choose a smaller -K or --width" in message


def test_check_memory_accepts_what_fits_and_what_cannot_be_measured(monkeypatch):
    monkeypatch.setattr(factory, "free_memory", lambda device: 16 * 2 ** 30)
    factory.check_memory(huge(), Config(K=8), CPU)
    monkeypatch.setattr(factory, "free_memory", lambda device: None)
    factory.check_memory(huge(), Config(K=1000), CPU)


def test_build_checks_the_memory_before_allocating(monkeypatch):
    monkeypatch.setattr(factory, "free_memory", lambda device: 0)
    with pytest.raises(UsageError, match="choose a smaller -K or --width"):
        factory.build(Config(**SETTINGS), CPU)


# ---- where the data is read from ------------------------------------------------------------------

def test_data_folder_is_the_given_one_then_the_remembered_one_then_the_default():
    assert DataFolder.of("/given", "cifar10", "/trained") == DataFolder("/given", remembered=False)
    assert DataFolder.of(None, "cifar10", "/trained") == DataFolder("/trained", remembered=True)
    assert DataFolder.of("", "cifar10", "/trained") == DataFolder("/trained", remembered=True)
    assert DataFolder.of(None, "cifar10") == DataFolder("./datasets")
    assert DataFolder.of(None, "imagenet", None) == DataFolder("./datasets/imagenet")


def test_an_error_about_the_remembered_folder_says_how_to_read_elsewhere():
    error = DatasetError("cifar10 not found")
    assert DataFolder("/given").explain(error) is error
    assert str(DataFolder("/trained", remembered=True).explain(error)) == (
        "cifar10 not found (/trained is where the run was trained; give --data-root to read the dataset from "
        "elsewhere)")


@pytest.mark.parametrize("read", [factory.batches, factory.test_batches, factory.recalibration_batches])
def test_every_reading_of_a_remembered_folder_is_explained(tmp_path, read):
    cfg = Config(dataset="cifar10", recalibrate=10)
    with pytest.raises(DatasetError) as error:
        read(cfg, DataFolder.of(None, "cifar10", str(tmp_path / "gone")), CPU, World())
    assert str(error.value).endswith(f"({tmp_path / 'gone'} is where the run was trained; give --data-root to read "
                                     f"the dataset from elsewhere)")
    with pytest.raises(DatasetError) as error:
        read(cfg, DataFolder.of(str(tmp_path / "gone"), "cifar10"), CPU, World())
    assert "where the run was trained" not in str(error.value)
