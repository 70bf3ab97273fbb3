"""Reading CIFAR from its on-disk pickles, the dataset registry, and the batches the
device loader makes."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

from data import DATASETS, DatasetError, DeviceLoader, normalize, random_crop_flip
from data.synthetic import write_cifar

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the authors' CIFAR normalisation


def read_cifar(root, name):
    spec = DATASETS[name]
    return (*spec.read(root, "train"), *spec.read(root, "test"))


def test_registry_knows_each_datasets_classes_size_and_normalisation():
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        spec = DATASETS[name]
        assert (spec.num_classes, spec.image_size, spec.mean, spec.std) == (classes, 32, MEAN, STD)


def random_arrays(n_train, n_test, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n_train),
            rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n_test))


@pytest.mark.parametrize("name,classes,files", [
    ("cifar100", 100, ["train", "test", "meta"]),
    ("cifar10", 10, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
])
def test_reader_round_trip_in_the_official_layout(tmp_path, name, classes, files):
    arrays = random_arrays(23, 7, classes)
    folder = write_cifar(str(tmp_path), name, *arrays)
    assert sorted(os.listdir(folder)) == sorted(files)
    train_x, train_y, test_x, test_y = read_cifar(str(tmp_path), name)
    assert train_x.dtype == torch.uint8 and train_x.shape == (23, 3, 32, 32)
    np.testing.assert_array_equal(train_x.numpy(), arrays[0])
    np.testing.assert_array_equal(train_y.numpy(), arrays[1])
    np.testing.assert_array_equal(test_x.numpy(), arrays[2])
    np.testing.assert_array_equal(test_y.numpy(), arrays[3])


def test_files_are_python2_pickles_like_the_originals(tmp_path):
    """Their strings are Python 2 str: loadable with encoding='latin1' (str keys) or
    'bytes' (bytes keys), not with Python 3's default."""
    folder = write_cifar(str(tmp_path), "cifar100", *random_arrays(4, 2, 100))
    raw = open(os.path.join(folder, "test"), "rb").read()
    assert set(pickle.loads(raw, encoding="latin1")) >= {"data", "fine_labels", "coarse_labels", "filenames"}
    assert b"data" in pickle.loads(raw, encoding="bytes")
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)


def test_missing_dataset_names_the_download_script(tmp_path):
    with pytest.raises(DatasetError, match=r"bash download_data.sh cifar100") as error:
        read_cifar(str(tmp_path), "cifar100")
    assert "cifar-100-python" in str(error.value) and "\n" not in str(error.value)


def test_unparseable_file_is_named(tmp_path):
    folder = write_cifar(str(tmp_path), "cifar10", *random_arrays(10, 4, 10))
    path = os.path.join(folder, "data_batch_3")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DatasetError, match="cannot read .*data_batch_3"):
        read_cifar(str(tmp_path), "cifar10")


def coordinate_images(n):
    """Images whose pixels say where they come from: R = 10 + row, G = 10 + column,
    B = 255 (padding, being zero in every channel, is unmistakable)."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    cols = torch.arange(32).view(1, 32).expand(32, 32)
    image = torch.stack([10 + rows, 10 + cols, torch.full((32, 32), 255)]).to(torch.uint8)
    return image.expand(n, 3, 32, 32).contiguous()


def test_crop_offsets_cover_minus4_to_4_with_zero_padding_and_flips():
    torch.manual_seed(0)
    n = 4000
    out = random_crop_flip(coordinate_images(n), padding=4).long()
    assert out.shape == (n, 3, 32, 32)
    inside = out[:, 2] == 255
    padding = ~inside
    assert (out[:, :2][padding.unsqueeze(1).expand(-1, 2, -1, -1)] == 0).all()  # zero in pixel space
    # the window's centre pixel is always inside the image: read the offsets there
    centre_row = out[:, 0, 16, 16] - 10
    centre_col = out[:, 1, 16, 16] - 10
    dy = centre_row - 16
    # a flipped image shows column 31 - j at position j, so its columns decrease
    flipped = out[:, 1, 16, 17] < out[:, 1, 16, 16]
    dx = torch.where(flipped, (31 - 16) - centre_col, centre_col - 16)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets + 4, minlength=9)
        assert offsets.min() == -4 and offsets.max() == 4
        expected = n / 9
        assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    rate = flipped.float().mean().item()
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / n)


def test_normalisation_is_to_unit_range_then_mean_and_std():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    expected = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    out = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_training_epoch_visits_every_image_once_in_a_new_order():
    torch.manual_seed(0)
    images = torch.zeros(103, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(103)
    loader = DeviceLoader(images, labels, 10, True, "cpu", MEAN, STD)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert len(loader) == 11 and sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, second)


def test_a_last_training_batch_of_one_image_is_dropped():
    images = torch.zeros(21, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(21), 10, True, "cpu", MEAN, STD)
    assert [len(y) for _, y in loader] == [10, 10]
    evaluation = DeviceLoader(images, torch.arange(21), 10, False, "cpu", MEAN, STD)
    assert [len(y) for _, y in evaluation] == [10, 10, 1]


def test_evaluation_batches_are_the_stored_images_normalised():
    images = torch.randint(0, 256, (25, 3, 32, 32), dtype=torch.uint8)
    loader = DATASETS["cifar10"].loader(images, torch.arange(25), 10, False, "cpu")
    batches = list(loader)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), normalize(images, MEAN, STD), rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(25))


def test_the_digits_are_real_handwriting_in_the_cifar10_format(tmp_path):
    """scikit-learn's 1,797 digits, enlarged to 32 x 32 and split a fifth of each class to the
    test set: read back by the CIFAR-10 reader, every class in both splits, no image twice."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from data.digits import write_digits
    write_digits(str(tmp_path))
    train_x, train_y = DATASETS["cifar10"].read(str(tmp_path), "train")
    test_x, test_y = DATASETS["cifar10"].read(str(tmp_path), "test")
    assert len(train_y) + len(test_y) == len(load_digits().target) == 1797
    assert train_x.shape[1:] == test_x.shape[1:] == (3, 32, 32) and train_x.dtype == torch.uint8
    counts = torch.bincount(test_y, minlength=10).float() / torch.bincount(torch.cat([train_y, test_y])).float()
    assert ((counts - 0.2).abs() < 0.01).all()  # a fifth of every class
    assert torch.equal(train_x[:, 0], train_x[:, 1]) and torch.equal(train_x[:, 1], train_x[:, 2])  # grey
    flat = torch.cat([train_x, test_x]).flatten(1)
    assert len(torch.unique(flat, dim=0)) > 1700  # real images, almost all different
