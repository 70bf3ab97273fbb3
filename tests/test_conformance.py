"""Every entry of the registries honours its protocol, checked on the registries
themselves: a network added to ``models.MODELS`` is tested here without editing this
file, and so is a dataset added to ``data.DATASETS`` once ``WRITERS`` can write its
layout on disk (a test fails, naming it, until then).

Datasets (the protocol of data/__init__.py), on small generated datasets in each one's
real on-disk layout: 21 training and 9 test images of 3 classes, every image of one
colour of its own, so that an image is recognised by its centre pixel whatever the
augmentation did to it. Networks (models/__init__.py): each builds, runs forward and
backward, marks its binary weights, and splits its forward pass as ``body(stem(x))``."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from config import Config
from data import DATASETS, ImageFolders, InMemory, memory_format
from data.synthetic import write_cifar, write_image_folders, write_tiny_imagenet
from models import ALIASES, MODELS, build_model, canonical_name, is_binary
from utils.distributed import World

CPU = torch.device("cpu")
TRAIN, TEST, CLASSES = 21, 9, 3
BATCH, EVAL_BATCH = 4, 3


def colour(k):
    """The colour of image k (0..20 training, 21..29 test): 8 apart in red and in green."""
    return 8 * k + 4, 250 - 8 * k, (40 * k) % 200 + 20


# ---- the datasets, written -------------------------------------------------------------------------

def _write_cifar(root, name):
    def split(first, count):
        ks = np.arange(first, first + count)
        images = np.stack([np.broadcast_to(np.array(colour(k), np.uint8)[:, None, None], (3, 32, 32)) for k in ks])
        return images, ks % CLASSES
    (train, train_labels), (test, test_labels) = split(0, TRAIN), split(TRAIN, TEST)
    write_cifar(root, name, train, train_labels, test, test_labels)
    return ({k: int(k % CLASSES) for k in range(TRAIN)},
            {TRAIN + i: int((TRAIN + i) % CLASSES) for i in range(TEST)})


def _paint(paths_and_labels, first):
    """Overwrite each JPEG with one colour: image ``first + i``; returns {image: label}."""
    labels = {}
    for i, (path, label) in enumerate(paths_and_labels):
        size = Image.open(path).size
        Image.new("RGB", size, colour(first + i)).save(path, "JPEG", quality=95)
        labels[first + i] = label
    return labels


def _class_files(folder, inner=""):
    """[(file, label)] of the class folders in ``folder`` (labels in sorted order of the classes)."""
    classes = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    return [(os.path.join(folder, wnid, inner, name), label) for label, wnid in enumerate(classes)
            for name in sorted(os.listdir(os.path.join(folder, wnid, inner))) if name.endswith(".JPEG")]


def _write_tiny_imagenet(root, name):
    folder = write_tiny_imagenet(root, classes=CLASSES, per_class=TRAIN // CLASSES, val_per_class=TEST // CLASSES)
    return (_paint(_class_files(os.path.join(folder, "train"), "images"), 0),
            _paint(_class_files(os.path.join(folder, "val"), "images"), TRAIN))


def _write_class_folders(root, name):
    """Class folders of JPEGs: ImageNet's layout, the layout of images of one's own."""
    return _write_imagenet(root, name)


def _write_imagenet(root, name):
    write_image_folders(root, CLASSES, (TRAIN // CLASSES, TEST // CLASSES), (30, 40))
    return (_paint(_class_files(os.path.join(root, "train")), 0),
            _paint(_class_files(os.path.join(root, "val")), TRAIN))


# Each dataset's layout on disk, written small: root -> ({train image: label}, {test image: label}).
WRITERS = {"cifar10": _write_cifar, "cifar100": _write_cifar, "tiny-imagenet": _write_tiny_imagenet,
           "imagenet": _write_imagenet, "imagefolder": _write_class_folders}
# The loader each kind of dataset serves a run with (data/__init__.py).
LOADERS = {InMemory: "device", ImageFolders: "torchvision"}
NAMES = sorted(DATASETS)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            assert name in WRITERS, f"data.DATASETS[{name!r}] has no writer of its layout in WRITERS"
            root = str(tmp_path_factory.mktemp(name))
            made[name] = (root, *WRITERS[name](root, name))
        return made[name]
    return get


def test_every_dataset_has_a_writer():
    assert set(DATASETS) <= set(WRITERS)
    assert all(loader_of(dataset) for dataset in DATASETS.values())


def loader_of(dataset):
    return next((loader for kind, loader in LOADERS.items() if isinstance(dataset, kind)), None)


def settings(name, virtual_ranks=1, recalibrate=12):
    return Config(dataset=name, batch_size=BATCH, eval_batch_size=EVAL_BATCH, seed=1, workers=0,
                  loader=loader_of(DATASETS[name]), virtual_ranks=virtual_ranks, recalibrate=recalibrate)


def loaders(written, name, rank, size, virtual_ranks=1):
    root, _, _ = written(name)
    return DATASETS[name].loaders(settings(name, virtual_ranks), root, World(rank=rank, size=size), CPU)


def identified(name, images):
    """Which image each one is, by the colour of its centre pixel (None: no colour is near)."""
    dataset = DATASETS[name]
    mean, std = torch.tensor(dataset.mean).view(1, 3), torch.tensor(dataset.std).view(1, 3)
    size = images.shape[-1]
    pixels = (images[:, :, size // 2, size // 2].float() * std + mean) * 255
    table = torch.tensor([colour(k) for k in range(TRAIN + TEST)], dtype=torch.float32)
    distance, found = (pixels[:, None, :2] - table[None, :, :2]).abs().max(-1).values.min(1)
    return [k if d < 3.5 else None for k, d in zip(found.tolist(), distance.tolist())]


def images_of(name, batches):
    return [k for images, _ in batches for k in identified(name, images)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


# ---- the training batches ------------------------------------------------------------------------------

# Batch sizes of one rank in an epoch, by the number of ranks R (processes x virtual ranks),
# from the protocol: the 21 images dealt to R ranks (padded to equal shares: 21, 11, 6),
# batches of 4, no batch of a single image (21 = 5 x 4 + 1: the last image waits for the
# next epoch).
RANK_BATCHES = {1: [4, 4, 4, 4, 4], 2: [4, 4, 3], 4: [4, 2]}
SPLITS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]  # (processes, virtual ranks of each)


@pytest.mark.parametrize("size,virtual", SPLITS)
@pytest.mark.parametrize("name", NAMES)
def test_training_batches_are_the_steps_of_every_virtual_rank(written, name, size, virtual):
    per_rank = RANK_BATCHES[size * virtual]
    for rank in range(size):
        train, _ = loaders(written, name, rank, size, virtual)
        assert len(train) == len(per_rank) * virtual
        batches = list(train)
        # step by step, one batch per virtual rank of this process
        assert [len(labels) for _, labels in batches] == [n for n in per_rank for _ in range(virtual)]


@pytest.mark.parametrize("name", NAMES)
def test_an_epoch_reads_distinct_images_and_the_next_epoch_another_order(written, name):
    train, _ = loaders(written, name, 0, 1)
    first, second = images_of(name, train), images_of(name, train)
    for epoch in (first, second):
        assert None not in epoch and len(epoch) == 20 == len(set(epoch))
        assert set(epoch) <= set(range(TRAIN))
    assert first != second


@pytest.mark.parametrize("name", NAMES)
def test_the_ranks_of_a_step_read_different_images(written, name):
    batches = [images_of(name, loaders(written, name, rank, 2)[0]) for rank in (0, 1)]
    assert not set(batches[0][:10]) & set(batches[1][:10])  # 11 each: one image is read twice in padding
    assert set(batches[0]) | set(batches[1]) == set(range(TRAIN))


@pytest.mark.parametrize("size,virtual,rank", [(1, 1, 0), (2, 2, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_a_state_dict_restored_in_a_new_loader_gives_the_same_next_epoch(written, name, size, virtual, rank):
    train, _ = loaders(written, name, rank, size, virtual)
    first = list(train)
    state = copy.deepcopy(train.state_dict())
    second = list(train)
    restored, _ = loaders(written, name, rank, size, virtual)
    restored.load_state_dict(state)
    assert same_batches(list(restored), second)
    anew, _ = loaders(written, name, rank, size, virtual)
    assert same_batches(list(anew), first) and not same_batches(first, second)


# ---- the batches themselves ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_batches_are_float32_images_in_the_devices_memory_format_with_their_int64_labels(written, name):
    _, train_labels, test_labels = written(name)
    size = settings(name).image_size
    train, test = loaders(written, name, 0, 1)
    for batches, labels_of in ((list(train), train_labels), (list(test), test_labels)):
        for images, labels in batches:
            assert images.dtype == torch.float32 and images.device == CPU and images.shape[1:] == (3, size, size)
            assert images.is_contiguous(memory_format=memory_format(CPU))
            assert labels.dtype == torch.int64 and labels.device == CPU and labels.shape == (len(images),)
            assert labels.tolist() == [labels_of[k] for k in identified(name, images)]


@pytest.mark.parametrize("name", NAMES)
def test_images_are_normalised_with_the_datasets_mean_and_std(written, name):
    _, test = loaders(written, name, 0, 1)
    images, _ = next(iter(test))
    size = images.shape[-1]
    expected = torch.tensor([colour(TRAIN + i) for i in range(len(images))], dtype=torch.float32) / 255
    expected = (expected - torch.tensor(DATASETS[name].mean)) / torch.tensor(DATASETS[name].std)
    assert torch.allclose(images[:, :, size // 2, size // 2], expected, atol=0.06)  # JPEG: a colour level or two


# ---- the test set: every image once --------------------------------------------------------------------

# A rank's test images: the rank's contiguous slice of the 9 (3 | 4 + 5 | 3 + 3 + 3).
TEST_SHARES = {1: [9], 2: [4, 5], 3: [3, 3, 3]}


@pytest.mark.parametrize("size,virtual", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("name", NAMES)
def test_every_test_image_is_on_exactly_one_rank(written, name, size, virtual):
    root, _, test_labels = written(name)
    seen, shares = [], []
    for rank in range(size):
        _, test = loaders(written, name, rank, size, virtual)
        alone = DATASETS[name].test_loader(settings(name, virtual), root, World(rank=rank, size=size), CPU)
        batches = list(test)
        assert same_batches(list(alone), batches)  # an evaluation reads what a run reads
        assert len(test) == len(batches) == -(-TEST_SHARES[size][rank] // EVAL_BATCH)
        shares.append(sum(len(labels) for _, labels in batches))
        seen += images_of(name, batches)
    assert shares == TEST_SHARES[size]
    assert sorted(seen) == sorted(test_labels)


# ---- the recalibration images --------------------------------------------------------------------------

def recalibration(written, name, rank, size, virtual=1, recalibrate=12):
    root, _, _ = written(name)
    return DATASETS[name].recalibration_loader(settings(name, virtual, recalibrate), root,
                                               World(rank=rank, size=size), CPU)


# --recalibrate 12 with R ranks: 12 / R images per rank in batches of 4 (12 | 6 = 4 + 2 | 3);
# a process yields at each step the batches of its virtual ranks joined.
RECALIBRATION_BATCHES = {1: [4, 4, 4], 2: [4, 2], 4: [3]}


@pytest.mark.parametrize("size,virtual", SPLITS)
@pytest.mark.parametrize("name", NAMES)
def test_recalibration_yields_the_union_batch_of_each_processes_ranks_the_same_at_every_pass(
        written, name, size, virtual):
    per_rank = RECALIBRATION_BATCHES[size * virtual]
    for rank in range(size):
        batches = recalibration(written, name, rank, size, virtual)
        first = list(batches)
        assert len(batches) == len(first) == len(per_rank)
        assert [len(labels) for _, labels in first] == [n * virtual for n in per_rank]
        assert same_batches(list(batches), first)


@pytest.mark.parametrize("name", NAMES)
def test_the_ranks_recalibration_shards_together_are_the_chosen_images(written, name):
    _, train_labels, _ = written(name)
    chosen = {}
    for size, virtual in SPLITS:
        images = []
        for rank in range(size):
            batches = list(recalibration(written, name, rank, size, virtual))
            images += images_of(name, batches)
            for x, labels in batches:
                assert labels.tolist() == [train_labels[k] for k in identified(name, x)]
        assert len(images) == 12 == len(set(images)) and set(images) <= set(range(TRAIN))
        chosen[size, virtual] = set(images)
    assert len(set(map(frozenset, chosen.values()))) == 1  # the same 12 images, however many ranks


@pytest.mark.parametrize("name", NAMES)
def test_a_step_of_recalibration_is_the_same_union_whatever_the_processes(written, name):
    """The union over the processes at every step, for R = 2 and R = 4 ranks."""
    for splits in ([(1, 2), (2, 1)], [(1, 4), (2, 2), (4, 1)]):
        unions = []
        for size, virtual in splits:
            processes = [list(recalibration(written, name, rank, size, virtual)) for rank in range(size)]
            unions.append([(torch.cat([p[step][0] for p in processes]), torch.cat([p[step][1] for p in processes]))
                           for step in range(len(processes[0]))])
        assert all(same_batches(union, unions[0]) for union in unions[1:])


@pytest.mark.parametrize("name", NAMES)
def test_recalibration_on_more_images_than_the_set_reads_the_set_as_training_reads_it(written, name):
    images = images_of(name, recalibration(written, name, 0, 1, recalibrate=1000))
    assert len(images) == 20 == len(set(images))  # all 21, batched by 4 without a last batch of one image


# ---- the networks ------------------------------------------------------------------------------------

WIDTH, CLASSES_OUT = 4, 5
NETWORKS = [(name, size) for name in sorted(MODELS) for size in MODELS[name].image_sizes]


def network(name, size):
    torch.manual_seed(0)
    return build_model(name, CLASSES_OUT, WIDTH, size)


def images(size, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def binary_layers(model):
    """The modules that hold a binary weight of their own."""
    return [m for m in model.modules() if any(is_binary(p) for p in m.parameters(recurse=False))]


def test_every_network_is_made_for_some_image_size_and_is_1W32A_or_1W1A():
    for name, entry in MODELS.items():
        assert entry.image_sizes and entry.width >= 1 and entry.mode in ("1W32A", "1W1A"), name


def test_every_alias_names_a_network_of_the_registry():
    assert all(canonical_name(alias) == target and target in MODELS for alias, target in ALIASES.items())
    assert all(canonical_name(name) == name for name in MODELS)


@pytest.mark.parametrize("name,size", NETWORKS)
def test_a_network_trains_forward_and_backward_into_its_binary_weights(name, size):
    model = network(name, size).train()
    logits = model(images(size))
    assert logits.shape == (2, CLASSES_OUT) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    binary = [(n, p) for n, p in model.named_parameters() if is_binary(p)]
    assert binary, "no binary weight marked"
    for n, p in binary:
        assert p.dim() >= 2, n  # a layer's weight
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), n


@pytest.mark.parametrize("name,size", NETWORKS)
def test_a_network_splits_its_forward_pass_into_stem_and_body(name, size):
    model = network(name, size).eval()
    x = images(size)
    with torch.no_grad():
        assert torch.equal(model(x), model.body(model.stem(x)))


@pytest.mark.parametrize("name,size", NETWORKS)
def test_the_stem_does_not_depend_on_the_binary_weights(name, size):
    model = network(name, size).eval()
    x = images(size)
    with torch.no_grad():
        stem, out = model.stem(x), model(x)
        draws = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if is_binary(p):  # another sample of the binary weights
                p.copy_(torch.randn(p.shape, generator=draws).sign())
        assert torch.equal(model.stem(x), stem)
        assert not torch.equal(model(x), out)


@pytest.mark.parametrize("name,size", NETWORKS)
def test_a_1W1A_network_binarises_the_input_of_every_binary_layer_and_a_1W32A_network_of_none(name, size):
    model = network(name, size).eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for m in binary_layers(model)]
    with torch.no_grad():
        model(images(size))
        for hook in hooks:
            hook.remove()
        unchanged = [torch.equal(m(x), m(torch.sign(x))) for m, x in seen]
    assert len(seen) == len(binary_layers(model))
    if MODELS[name].mode == "1W1A":
        assert all(unchanged)
    else:
        assert not any(unchanged)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_network_refuses_an_image_size_it_is_not_made_for(name):
    with pytest.raises(ValueError, match=f"{name} takes images of .* pixels, not 48"):
        build_model(name, CLASSES_OUT, WIDTH, 48)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_network_without_a_width_has_the_papers(name):
    with torch.device("meta"):
        default, paper = build_model(name, CLASSES_OUT), build_model(name, CLASSES_OUT, MODELS[name].width)
    assert [p.shape for p in default.parameters()] == [p.shape for p in paper.parameters()]
