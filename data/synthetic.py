"""Small generated datasets written in the real on-disk formats of CIFAR,
Tiny-ImageNet and ImageNet.

They let the real reading code run where the datasets cannot be downloaded (the demo,
the tests). The CIFAR files are Python-2-style pickles like the originals: their
strings are Python 2 ``str`` objects, so they load only with
``encoding="latin1"`` (or "bytes"), exactly as the downloaded files do. The
Tiny-ImageNet ones are JPEGs in the folders of the official zip; the ImageNet ones
JPEGs in ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (``write_image_folders``).
"""
import os
import pickle
import struct

import numpy as np

from .cifar import LAYOUTS


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (the BINSTRING opcodes) - the encoding of
    the keys, names and raw array data in the CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _dump(path, entry):
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(entry)


def _batch(images, labels, label_key, description):
    entry = {
        b"batch_label": description.encode(),
        label_key.encode(): [int(v) for v in labels],
        b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 3 * 32 * 32),
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(len(images))],
    }
    if label_key == "fine_labels":  # CIFAR-100 also has 20 superclasses
        entry[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return entry


def write_cifar(root, name, train_images, train_labels, test_images, test_labels):
    """Write uint8 images (N, 3, 32, 32) and labels under ``root`` in the layout of
    ``name`` ("cifar10": 5 training batches + test_batch + batches.meta;
    "cifar100": train + test + meta). Returns the dataset folder."""
    folder, train_files, test_file, label_key, num_classes = LAYOUTS[name]
    directory = os.path.join(root, folder)
    os.makedirs(directory, exist_ok=True)
    parts = np.array_split(np.arange(len(train_labels)), len(train_files))
    for i, (file, part) in enumerate(zip(train_files, parts)):
        _dump(os.path.join(directory, file),
              _batch(train_images[part], np.asarray(train_labels)[part], label_key,
                     f"training batch {i + 1} of {len(train_files)}"))
    _dump(os.path.join(directory, test_file),
          _batch(test_images, test_labels, label_key, "testing batch 1 of 1"))
    names = [f"class_{i}".encode() for i in range(num_classes)]
    if name == "cifar10":
        meta_file, meta = "batches.meta", {b"label_names": names, b"num_cases_per_batch": len(parts[0]),
                                           b"num_vis": 3072}
    else:
        meta_file, meta = "meta", {b"fine_label_names": names,
                                   b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]}
    _dump(os.path.join(directory, meta_file), meta)
    return directory


def structured_images(num_train, num_test, num_classes, seed=0, contrast=24.0, noise=64.0):
    """Images with real but not trivial class structure: every class has a blocky
    template (4x4 blocks of 8x8 pixels, each block grey 128 +- ``contrast`` per
    channel); an image is its class's template plus Gaussian pixel noise of std
    ``noise``. Returns (train_images, train_labels, test_images, test_labels) as
    numpy arrays, images uint8 (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-contrast, contrast, (num_classes, 3, 4, 4))
    templates = 128 + blocks.repeat(8, axis=2).repeat(8, axis=3)

    def draw(n):
        labels = rng.integers(0, num_classes, n)
        pixels = templates[labels] + rng.normal(0, noise, (n, 3, 32, 32))
        return np.clip(pixels, 0, 255).astype(np.uint8), labels

    train_images, train_labels = draw(num_train)
    test_images, test_labels = draw(num_test)
    return train_images, train_labels, test_images, test_labels


def write_structured_cifar(root, name, num_train, num_test, seed=0):
    """Generate a structured dataset with ``name``'s number of classes and write it
    under ``root`` in ``name``'s on-disk layout."""
    arrays = structured_images(num_train, num_test, LAYOUTS[name][4], seed)
    return write_cifar(root, name, *arrays)


# ---- Tiny-ImageNet ---------------------------------------------------------------------------

def write_tiny_imagenet(root, classes=10, per_class=20, val_per_class=5, test_images=0,
                        sorted_val=True, greyscale=0, seed=0, contrast=40.0, noise=40.0):
    """A small dataset in Tiny-ImageNet's on-disk layout under ``root``, returns its folder
    ``root/tiny-imagenet-200``: ``classes`` classes with made-up wnids (``n`` + 8 digits,
    written in an order that is not the sorted one) and ``per_class`` training and
    ``val_per_class`` validation JPEGs of 64x64 pixels each, plus ``test_images``
    unlabelled ones in test/images/, and wnids.txt, words.txt, the boxes files and
    val/val_annotations.txt like the original.

    ``sorted_val=False`` leaves val/ as the official zip has it (val/images/ and the
    annotations); True sorts it into val/<wnid>/images/ as download_data.sh does. The
    first ``greyscale`` images of each split are greyscale JPEGs (the real data have
    some). The images have class structure as ``structured_images``: a blocky colour
    template per class (4x4 blocks of 16x16 pixels) plus pixel noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    wnids = [f"n{d:08d}" for d in rng.choice(10 ** 8, classes, replace=False)]
    if wnids == sorted(wnids) and classes > 1:  # the labels must follow the sorted order, not this one
        wnids = wnids[::-1]
    templates = 128 + rng.uniform(-contrast, contrast, (classes, 4, 4, 3)).repeat(16, axis=1).repeat(16, axis=2)
    folder = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(folder, exist_ok=True)
    written = [0]

    def save(path, label):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pixels = np.clip(templates[label] + rng.normal(0, noise, (64, 64, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if written[0] < greyscale:
            image = image.convert("L")
        written[0] += 1
        image.save(path, "JPEG", quality=90)

    def box():
        x0, y0 = rng.integers(0, 32, 2)
        return f"{x0}\t{y0}\t{x0 + rng.integers(16, 32)}\t{y0 + rng.integers(16, 32)}"

    with open(os.path.join(folder, "wnids.txt"), "w") as f:
        f.writelines(f"{w}\n" for w in wnids)
    with open(os.path.join(folder, "words.txt"), "w") as f:
        f.writelines(f"{w}\tclass {i}\n" for i, w in enumerate(wnids))
    for label, wnid in enumerate(wnids):
        boxes = []
        for k in range(per_class):
            name = f"{wnid}_{k}.JPEG"
            save(os.path.join(folder, "train", wnid, "images", name), label)
            boxes.append(f"{name}\t{box()}\n")
        with open(os.path.join(folder, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.writelines(boxes)
    written[0] = 0
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    annotations = []
    for k, label in enumerate(val_labels):
        name = f"val_{k}.JPEG"
        where = ("images",) if not sorted_val else (wnids[label], "images")
        save(os.path.join(folder, "val", *where, name), label)
        annotations.append(f"{name}\t{wnids[label]}\t{box()}\n")
    with open(os.path.join(folder, "val", "val_annotations.txt"), "w") as f:
        f.writelines(annotations)
    written[0] = 0
    for k in range(test_images):
        save(os.path.join(folder, "test", "images", f"test_{k}.JPEG"), rng.integers(classes))
    return folder


def write_tiny_imagenet_zip(path, **kwargs):
    """The official zip's layout (one top folder tiny-imagenet-200/, val/ unsorted) of a
    ``write_tiny_imagenet(**kwargs)`` dataset, written to ``path``; returns ``path``."""
    import tempfile

    with tempfile.TemporaryDirectory() as staging:
        return zip_folder(write_tiny_imagenet(staging, **dict(kwargs, sorted_val=False)), path)


def zip_folder(folder, path):
    """Zip ``folder`` (as its top folder, with its directory entries, in sorted order) to
    ``path``; returns ``path``."""
    import zipfile

    parent = os.path.dirname(os.path.abspath(folder))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for where, directories, names in sorted(os.walk(folder)):
            directories.sort()
            relative = os.path.relpath(where, parent)
            archive.write(where, relative + "/")
            for name in sorted(names):
                archive.write(os.path.join(where, name), os.path.join(relative, name))
    return path


# ---- ImageNet ----------------------------------------------------------------------------------

def image_folder_classes(classes):
    """WordNet-id-like class names ("n00000000", "n00000001", ...) for a number of
    classes, or the given names."""
    if isinstance(classes, int):
        return [f"n{i:08d}" for i in range(classes)]
    return list(classes)


def write_image_folders(root, classes, per_class, size, seed=0, val_sorted=True, quality=90,
                        contrast=48.0, noise=24.0):
    """Write a small dataset in the ImageNet layout under ``root`` and return ``root``:
    ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<n>.JPEG``
    (``val/ILSVRC2012_val_<n>.JPEG``, all in one folder as in the downloaded archive,
    when ``val_sorted`` is False).

    ``classes``: a number of classes or a list of class names; ``per_class``: images
    per class, one number for both splits or (train, val); ``size``: (height, width)
    or one number for square images. The images have real class structure: every
    class has a blocky colour template (4x4 blocks, each channel 128 +- ``contrast``),
    an image is its class's template plus Gaussian pixel noise of std ``noise``."""
    from PIL import Image

    names = image_folder_classes(classes)
    train_count, val_count = (per_class, per_class) if isinstance(per_class, int) else per_class
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-contrast, contrast, (len(names), 4, 4, 3))
    rows = np.arange(height) * 4 // height
    cols = np.arange(width) * 4 // width
    templates = 128 + blocks[:, rows][:, :, cols]  # (classes, height, width, 3)

    def write(path, label):
        pixels = templates[label] + rng.normal(0, noise, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)

    val_number = 0
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, "train", name), exist_ok=True)
        for i in range(train_count):
            write(os.path.join(root, "train", name, f"{name}_{i}.JPEG"), label)
        folder = os.path.join(root, "val", name) if val_sorted else os.path.join(root, "val")
        os.makedirs(folder, exist_ok=True)
        for _ in range(val_count):
            val_number += 1
            write(os.path.join(folder, f"ILSVRC2012_val_{val_number:08d}.JPEG"), label)
    return root
