"""download_data.sh against a local HTTP server on 127.0.0.1 that serves small archives
in the official layout: a verified download, no second download, and nothing left
behind after a checksum mismatch, a server that goes away, or an interruption; for
Tiny-ImageNet also val/ sorted into class folders before the dataset appears."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from data import DATASETS
from data.synthetic import write_cifar, write_tiny_imagenet, write_tiny_imagenet_zip, zip_folder
from helpers import REPO, run_script, script_env, wait_for

SERVER = os.path.join(REPO, "tests", "archive_server.py")
DOWNLOADERS = [tool for tool in ("curl", "wget") if shutil.which(tool)] + ["python"]
UNZIPPERS = (["unzip"] if shutil.which("unzip") else []) + ["python"]
# a small Tiny-ImageNet: 3 classes, 4 + 2 images each, 2 unlabelled test images, a greyscale one
TINY = dict(classes=3, per_class=4, val_per_class=2, test_images=2, greyscale=1, seed=5)


def np_uint8_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """{dataset: (archive path, its md5, the arrays inside)}: archives laid out like the
    official ones (one top folder: cifar-100-python/ or cifar-10-batches-py/)."""
    root = tmp_path_factory.mktemp("archives")
    made = {}
    for name, folder, classes in (("cifar100", "cifar-100-python", 100),
                                  ("cifar10", "cifar-10-batches-py", 10)):
        rng = np.random.default_rng(len(made))
        arrays = (np_uint8_images(50, 1), rng.integers(0, classes, 50),
                  np_uint8_images(20, 2), rng.integers(0, classes, 20))
        write_cifar(str(root / "src"), name, *arrays)
        path = root / f"{folder}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(root / "src" / folder, arcname=folder)
        made[name] = (str(path), hashlib.md5(path.read_bytes()).hexdigest(), arrays)
    path = write_tiny_imagenet_zip(str(root / "tiny-imagenet-200.zip"), **TINY)
    made["tiny-imagenet"] = (path, hashlib.md5(open(path, "rb").read()).hexdigest(), None)
    return made


@contextmanager
def server(archive, mode, request_log):
    """A server answering every GET with ``archive`` (mode: ok / die / stall, see
    archive_server.py); yields its URL."""
    process = subprocess.Popen([sys.executable, SERVER, archive, mode, str(request_log)],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}/cifar.tar.gz"
    finally:
        process.kill()
        process.wait()


def requests(log):
    return log.read_text().splitlines() if log.exists() else []


def download(data_root, url, md5, downloader="curl", *args):
    return run_script("download_data.sh", *args, DATA_ROOT=data_root, CIFAR100_URL=url,
                      CIFAR100_MD5=md5, DOWNLOADER=downloader, timeout=120)


def one_error_line(result):
    """A failure is reported on one line of stderr that starts with 'error:'."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def assert_same_arrays(data_root, name, arrays):
    (train_x, train_y), (test_x, test_y) = (DATASETS[name].read(str(data_root), split)
                                            for split in ("train", "test"))
    assert torch.equal(train_x, torch.from_numpy(arrays[0]))
    assert train_y.tolist() == list(arrays[1])
    assert torch.equal(test_x, torch.from_numpy(arrays[2]))
    assert test_y.tolist() == list(arrays[3])


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_download_verifies_extracts_and_is_not_repeated(tmp_path, archives, downloader):
    archive, md5, arrays = archives["cifar100"]
    data_root, log = tmp_path / "datasets", tmp_path / "requests.log"
    with server(archive, "ok", log) as url:
        first = download(data_root, url, md5, downloader)
        assert first.returncode == 0, first.stderr
        assert "verified" in first.stdout
        assert os.listdir(data_root) == ["cifar-100-python"]  # no temporary file left
        assert_same_arrays(data_root, "cifar100", arrays)
        assert len(requests(log)) == 1

        again = download(data_root, url, md5, downloader)
        assert again.returncode == 0, again.stderr
        assert "already downloaded and verified" in again.stdout
        assert len(requests(log)) == 1  # the server was not asked again

    # the server is gone: a verified dataset still needs nothing from the network
    offline = download(data_root, url, md5, downloader)
    assert offline.returncode == 0, offline.stderr
    assert "already downloaded and verified" in offline.stdout
    assert_same_arrays(data_root, "cifar100", arrays)


def test_checksum_mismatch_leaves_nothing(tmp_path, archives):
    archive, md5, _ = archives["cifar100"]
    data_root = tmp_path / "datasets"
    with server(archive, "ok", tmp_path / "requests.log") as url:
        result = download(data_root, url, "0" * 32)
    assert result.returncode != 0
    line = one_error_line(result)
    assert "checksum mismatch" in line and md5 in line and "0" * 32 in line
    assert not data_root.exists()  # the script made it, and removed it again empty


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_server_gone_midway_leaves_nothing(tmp_path, archives, downloader):
    archive, md5, arrays = archives["cifar100"]
    data_root = tmp_path / "datasets"
    with server(archive, "die", tmp_path / "requests.log") as url:
        result = download(data_root, url, md5, downloader)
    assert result.returncode != 0
    assert "downloading" in one_error_line(result) and "failed" in result.stderr
    assert not data_root.exists()  # the script made it, and removed it again empty
    # and the next attempt, with a server that stays, succeeds
    with server(archive, "ok", tmp_path / "requests.log") as url:
        retry = download(data_root, url, md5, downloader)
    assert retry.returncode == 0, retry.stderr
    assert_same_arrays(data_root, "cifar100", arrays)


def test_interrupted_download_leaves_nothing(tmp_path, archives):
    """SIGTERM while the transfer hangs half-way: the script stops at once, says so,
    and removes the partial archive."""
    archive, md5, _ = archives["cifar100"]
    data_root = tmp_path / "datasets"
    with server(archive, "stall", tmp_path / "requests.log") as url:
        process = subprocess.Popen(
            ["bash", os.path.join(REPO, "download_data.sh")], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=script_env(DATA_ROOT=data_root, CIFAR100_URL=url, CIFAR100_MD5=md5))

        def partial_archive_growing():
            names = os.listdir(data_root) if data_root.exists() else []
            return any(".tar.gz." in n and not n.endswith(".err") and
                       os.path.getsize(data_root / n) > 0 for n in names)

        wait_for(partial_archive_growing, timeout=60)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == "error: interrupted by SIGTERM; nothing was kept"
    assert not data_root.exists()  # the script made it, and removed it again empty


def test_all_fetches_every_dataset(tmp_path, archives):
    data_root = tmp_path / "datasets"
    (a100, md5_100, arrays100), (a10, md5_10, arrays10) = archives["cifar100"], archives["cifar10"]
    tiny, md5_tiny, _ = archives["tiny-imagenet"]
    with server(a100, "ok", tmp_path / "r100.log") as url100, server(a10, "ok", tmp_path / "r10.log") as url10, \
            server(tiny, "ok", tmp_path / "rtiny.log") as url_tiny:
        result = run_script("download_data.sh", "all", DATA_ROOT=data_root, CIFAR100_URL=url100,
                            CIFAR100_MD5=md5_100, CIFAR10_URL=url10, CIFAR10_MD5=md5_10,
                            TINY_IMAGENET_URL=url_tiny, TINY_IMAGENET_MD5=md5_tiny)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(data_root)) == ["cifar-10-batches-py", "cifar-100-python", "tiny-imagenet-200"]
    assert_same_arrays(data_root, "cifar100", arrays100)
    assert_same_arrays(data_root, "cifar10", arrays10)
    assert_same_tiny_imagenet(data_root, tmp_path / "expected")


def test_several_datasets_by_name(tmp_path, archives):
    data_root = tmp_path / "datasets"
    (a100, md5_100, _), (a10, md5_10, _) = archives["cifar100"], archives["cifar10"]
    with server(a100, "ok", tmp_path / "r100.log") as url100, server(a10, "ok", tmp_path / "r10.log") as url10:
        result = run_script("download_data.sh", "cifar10", "cifar100", DATA_ROOT=data_root,
                            CIFAR100_URL=url100, CIFAR100_MD5=md5_100, CIFAR10_URL=url10, CIFAR10_MD5=md5_10)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(data_root)) == ["cifar-10-batches-py", "cifar-100-python"]


def test_incomplete_dataset_folder_is_reported_not_replaced(tmp_path):
    folder = tmp_path / "datasets" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(b"half of a dataset")
    # the URL is never contacted: nothing listens on port 9
    result = download(tmp_path / "datasets", "http://127.0.0.1:9/x.tar.gz", "0" * 32)
    assert result.returncode != 0
    assert "incomplete (no test)" in one_error_line(result)
    assert sorted(os.listdir(folder)) == ["train"]
    assert (folder / "train").read_bytes() == b"half of a dataset"


def test_unknown_dataset_is_a_usage_error(tmp_path):
    for args in (["imagenet"], ["cifar10", "imagenet"]):
        result = run_script("download_data.sh", *args, DATA_ROOT=tmp_path)
        assert result.returncode == 2
        assert "usage: bash download_data.sh [cifar100|cifar10|tiny-imagenet|all]..." in result.stderr
        assert os.listdir(tmp_path) == []


# ---- Tiny-ImageNet ---------------------------------------------------------------------------

def download_tiny(data_root, url, md5, **env):
    return run_script("download_data.sh", "tiny-imagenet", DATA_ROOT=data_root, TINY_IMAGENET_URL=url,
                      TINY_IMAGENET_MD5=md5, timeout=120, **env)


def tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    found = {}
    for where, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(where, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def assert_same_tiny_imagenet(data_root, scratch):
    """The downloaded dataset is, file for file, the generated one with val/ sorted
    (val/<wnid>/images/<file>, no val/images/), and reads as such."""
    expected = write_tiny_imagenet(str(scratch), sorted_val=True, **TINY)
    got = tree(data_root / "tiny-imagenet-200")
    assert got.pop(".verified-md5").decode().strip()  # the script's marker
    assert got == tree(expected)
    assert not (data_root / "tiny-imagenet-200" / "val" / "images").exists()
    annotations = (data_root / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()
    for line in annotations:
        name, wnid = line.split("\t")[:2]
        assert (data_root / "tiny-imagenet-200" / "val" / wnid / "images" / name).is_file()
    for split in ("train", "test"):
        ours = DATASETS["tiny-imagenet"].read(str(data_root), split)
        theirs = DATASETS["tiny-imagenet"].read(str(scratch), split)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("unzipper", UNZIPPERS)
def test_tiny_imagenet_download_sorts_val_and_is_not_repeated(tmp_path, archives, unzipper):
    archive, md5, _ = archives["tiny-imagenet"]
    data_root, log = tmp_path / "datasets", tmp_path / "requests.log"
    with server(archive, "ok", log) as url:
        first = download_tiny(data_root, url, md5, UNZIPPER=unzipper)
        assert first.returncode == 0, first.stderr
        assert f"tiny-imagenet: verified (md5 {md5})" in first.stdout
        assert os.listdir(data_root) == ["tiny-imagenet-200"]  # no temporary file left
        assert len(requests(log)) == 1
        again = download_tiny(data_root, url, md5, UNZIPPER=unzipper)
        assert again.returncode == 0, again.stderr
        assert "tiny-imagenet: already downloaded and verified" in again.stdout
        assert len(requests(log)) == 1
    assert_same_tiny_imagenet(data_root, tmp_path / "expected")


def test_tiny_imagenet_checksum_mismatch_leaves_nothing(tmp_path, archives):
    archive, md5, _ = archives["tiny-imagenet"]
    data_root = tmp_path / "datasets"
    with server(archive, "ok", tmp_path / "requests.log") as url:
        result = download_tiny(data_root, url, "f" * 32)
    assert result.returncode != 0
    line = one_error_line(result)
    assert line.startswith("error: tiny-imagenet: checksum mismatch") and md5 in line and "f" * 32 in line
    assert not data_root.exists()  # the script made it, and removed it again empty


def test_tiny_imagenet_val_that_cannot_be_sorted_leaves_nothing(tmp_path):
    """An image of val/images that val_annotations.txt does not name: the script stops
    before the dataset appears."""
    folder = write_tiny_imagenet(str(tmp_path / "src"), sorted_val=False, **TINY)
    annotations = os.path.join(folder, "val", "val_annotations.txt")
    lines = open(annotations).readlines()
    open(annotations, "w").writelines(lines[:-1])
    archive = zip_folder(folder, str(tmp_path / "broken.zip"))
    md5 = hashlib.md5(open(archive, "rb").read()).hexdigest()
    data_root = tmp_path / "datasets"
    with server(archive, "ok", tmp_path / "requests.log") as url:
        result = download_tiny(data_root, url, md5)
    assert result.returncode != 0
    line = one_error_line(result)
    assert "cannot prepare" in line and "not in val_annotations.txt" in line and lines[-1].split("\t")[0] in line
    assert not data_root.exists()  # the script made it, and removed it again empty


def test_tiny_imagenet_interrupted_download_leaves_nothing(tmp_path, archives):
    archive, md5, _ = archives["tiny-imagenet"]
    data_root = tmp_path / "datasets"
    with server(archive, "stall", tmp_path / "requests.log") as url:
        process = subprocess.Popen(
            ["bash", os.path.join(REPO, "download_data.sh"), "tiny-imagenet"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=script_env(DATA_ROOT=data_root, TINY_IMAGENET_URL=url, TINY_IMAGENET_MD5=md5))

        def partial_archive_growing():
            names = os.listdir(data_root) if data_root.exists() else []
            return any(".zip." in n and not n.endswith(".err") and
                       os.path.getsize(data_root / n) > 0 for n in names)

        wait_for(partial_archive_growing, timeout=60)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == "error: interrupted by SIGTERM; nothing was kept"
    assert not data_root.exists()  # the script made it, and removed it again empty


def test_an_archive_copied_by_hand_is_verified_and_extracted_offline(tmp_path, archives):
    """No network (a URL nobody answers): the archive of the URL's name in DATA_ROOT is used, and kept."""
    archive, md5, arrays = archives["cifar100"]
    data_root = tmp_path / "datasets"
    data_root.mkdir()
    shutil.copy(archive, data_root / "cifar-100-python.tar.gz")
    result = download(data_root, "http://127.0.0.1:9/cifar-100-python.tar.gz", md5)
    assert result.returncode == 0, result.stderr
    assert f"using the archive {data_root}/cifar-100-python.tar.gz" in result.stdout
    assert sorted(os.listdir(data_root)) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    assert_same_arrays(data_root, "cifar100", arrays)


def test_a_failed_download_says_how_to_go_on_without_a_network(tmp_path, archives):
    _, md5, _ = archives["cifar100"]
    data_root = tmp_path / "datasets"
    result = download(data_root, "http://127.0.0.1:9/cifar-100-python.tar.gz", md5)
    line = one_error_line(result)
    assert "downloading" in line and "copy cifar-100-python.tar.gz (md5 " in line and str(data_root) in line
    assert not data_root.exists()  # no empty folder left behind
