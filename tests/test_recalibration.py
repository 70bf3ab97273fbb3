"""Recalibrating the BatchNorm statistics of the mean network sign(M): against a float64
derivation by hand (numpy), against torch's update_bn, across two processes (gloo) that
each hold a part of every batch, and what it must leave as it was."""
import datetime
import os
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from models import BinaryConv2d, BinaryLinear
from optim import VISPA
from optim.recalibration import recalibrate
from utils import distributed

SIZES = (5, 8, 3)  # images per batch
EPS = 1e-5


class Net(nn.Module):
    """Binary conv -> BatchNorm2d -> ReLU (-> dropout) -> binary linear -> BatchNorm1d."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = BinaryConv2d(2, 4, 3, padding=1)
        self.norm2d = nn.BatchNorm2d(4, eps=EPS, momentum=0.3)
        self.drop = nn.Dropout(dropout)
        self.fc = BinaryLinear(4 * 4 * 4, 3)
        self.norm1d = nn.BatchNorm1d(3, eps=EPS)

    def forward(self, x):
        return self.norm1d(self.fc(self.drop(F.relu(self.norm2d(self.conv(x)))).flatten(1)))


def network(seed=0, dropout=0.0):
    """The float64 network and its VISPA, BatchNorms with affine parameters and running
    statistics that are not their initial ones (as after training)."""
    torch.manual_seed(seed)
    model = Net(dropout).double()
    with torch.no_grad():
        for norm in (model.norm2d, model.norm1d):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.num_batches_tracked.fill_(7)
    return model, VISPA(model.parameters(), lr=0.1, K=3, S=100.0, seed=seed)


def images(seed=1, sizes=SIZES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=generator) * 2 + 0.5 for n in sizes]


def labelled(batches):
    return [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]


def statistics(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def np64(t):
    return t.detach().double().numpy()


def expected_statistics(model, opt, batches):
    """The cumulative averages over the batches of each batch's per-channel mean and
    unbiased variance of each BatchNorm's input under sign(M), the second BatchNorm's
    input normalised with the first one's batch statistics (biased variance)."""
    sign = {p: np.sign(np64(opt.state[p]["M"])) for p in (model.conv.weight, model.fc.weight)}
    means, variances = {"norm2d": [], "norm1d": []}, {"norm2d": [], "norm1d": []}
    for x in batches:
        a = np64(F.conv2d(x, torch.from_numpy(sign[model.conv.weight]), padding=1)) * np64(model.conv.alpha)
        mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3))
        means["norm2d"].append(mean)
        variances["norm2d"].append(a.var((0, 2, 3), ddof=1))
        z = (a - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS)
        weight, bias = (np64(t)[None, :, None, None] for t in (model.norm2d.weight, model.norm2d.bias))
        z = np.maximum(z * weight + bias, 0)
        f = z.reshape(len(x), -1) @ sign[model.fc.weight].T * np64(model.fc.alpha)
        means["norm1d"].append(f.mean(0))
        variances["norm1d"].append(f.var(0, ddof=1))
    return {f"{name}.{key}": np.mean(values[name], axis=0)
            for name in means for key, values in (("running_mean", means), ("running_var", variances))}


def test_the_statistics_are_the_cumulative_averages_of_the_mean_networks_batch_statistics():
    model, opt = network()
    model.eval()  # as after an evaluation: the statistics are gathered in train mode all the same
    batches = images()
    assert recalibrate(model, opt, labelled(batches)) == sum(SIZES)
    assert not any(m.training for m in model.modules())
    for name, expected in expected_statistics(model, opt, batches).items():
        np.testing.assert_allclose(np64(model.get_buffer(name)), expected, rtol=1e-12, atol=1e-14, err_msg=name)
    assert model.norm2d.num_batches_tracked.item() == model.norm1d.num_batches_tracked.item() == len(SIZES)


def test_agrees_with_update_bn_on_the_mean_network_for_batches_of_images_alone():
    model, opt = network()
    assert recalibrate(model, opt, images()) == sum(SIZES)
    recalibrated = statistics(model)
    with opt.mean_params():
        update_bn(images(), model)
    for name, buffer in statistics(model).items():
        assert torch.equal(recalibrated[name], buffer), name


def test_momentum_and_modes_are_restored_and_nothing_else_changes():
    """A network after a training step (momenta in the optimizer's state), with dropout
    that draws in train mode, a BatchNorm in eval mode inside a network in train mode,
    and a BatchNorm whose momentum is None."""
    model, opt = network(dropout=0.5)
    with opt.sampled_params(train=True):
        model(images()[0]).square().sum().backward()
    opt.step()
    model.train()
    model.norm1d.eval()
    model.norm1d.momentum = None
    saved = opt.state_dict()
    optimizer_state = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
                       "generator": saved["generator"]["state"].clone()}
    parameters = [p.detach().clone() for p in model.parameters()]
    random_state = torch.get_rng_state()
    before = statistics(model)

    recalibrate(model, opt, labelled(images()))

    assert (model.norm2d.momentum, model.norm1d.momentum) == (0.3, None)
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    assert model.norm1d.num_batches_tracked.item() == len(SIZES)
    after = opt.state_dict()
    assert "M_momentum" in after["state"][0]
    for i, state in optimizer_state["state"].items():
        assert sorted(state) == sorted(after["state"][i])
        for key, value in state.items():
            assert torch.equal(value, after["state"][i][key]), (i, key)
    assert torch.equal(optimizer_state["generator"], after["generator"]["state"])
    assert all(torch.equal(a, b) for a, b in zip(parameters, model.parameters()))
    assert torch.equal(random_state, torch.get_rng_state())
    for weight in (model.conv.weight, model.fc.weight):
        assert torch.equal(weight, torch.sign(opt.state[weight]["M"]))
    assert not torch.equal(before["norm2d.running_mean"], model.norm2d.running_mean)


class Rival:
    """Another optimizer's protocol, and nothing else of it: its mean network is weights
    of its own, written into the layers for the context and taken out after."""

    def __init__(self, weights, means):
        self.weights, self.means = weights, means

    @contextmanager
    def mean_params(self):
        held = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            for w, mean in zip(self.weights, self.means):
                w.copy_(mean)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, value in zip(self.weights, held):
                    w.copy_(value)


def test_takes_any_optimizer_with_a_mean_params_context():
    model, opt = network()
    weights = [model.conv.weight, model.fc.weight]
    held = [w.detach().clone() for w in weights]
    generator = torch.Generator().manual_seed(5)
    rival = Rival(weights, [torch.randn(w.shape, dtype=w.dtype, generator=generator).sign() for w in weights])
    recalibrate(model, rival, images())
    recalibrated = statistics(model)
    assert all(torch.equal(w, h) for w, h in zip(weights, held))
    with rival.mean_params():
        update_bn(images(), model)
    assert all(torch.equal(recalibrated[name], buffer) for name, buffer in statistics(model).items())
    recalibrate(model, opt, images())
    assert not torch.equal(recalibrated["norm2d.running_mean"], model.norm2d.running_mean)


def test_a_network_without_batchnorm_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(BinaryConv2d(2, 3, 3), nn.ReLU())
    opt = VISPA(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^recalibrate: Sequential has no BatchNorm: there are no statistics"):
        recalibrate(model, opt, images())


def test_a_batchnorm_without_running_statistics_is_refused_by_name():
    model, opt = network()
    model.norm1d = nn.BatchNorm1d(3, track_running_stats=False).double()
    before = statistics(model)
    with pytest.raises(ValueError, match=r"^recalibrate: the BatchNorm 'norm1d' keeps no running statistics"):
        recalibrate(model, opt, images())
    assert all(torch.equal(before[name], buffer) for name, buffer in statistics(model).items())


def test_no_images_is_refused_and_the_statistics_stay_as_they_were():
    model, opt = network()
    before = statistics(model)
    with pytest.raises(ValueError, match=r"^recalibrate: no images: `batches` gave none"):
        recalibrate(model, opt, iter([]))
    assert all(torch.equal(before[name], buffer) for name, buffer in statistics(model).items())
    assert model.norm2d.momentum == 0.3


# ---- two processes, each with a part of every batch ---------------------------------------

SPLITS = (2, 4, 1)  # rank 0's images of each batch (of SIZES); rank 1 has the rest


def _rank(rank, folder):
    """One of two gloo processes: the union recalibration on its parts of the batches,
    then one with a batch fewer on rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    total = distributed.summing(distributed.World(rank, 2, rank))
    parts = [x[:k] if rank == 0 else x[k:] for x, k in zip(images(), SPLITS)]
    model, opt = network()
    result = {"images": recalibrate(model, opt, labelled(parts), total=total), "statistics": statistics(model)}
    before = statistics(model)
    try:
        recalibrate(model, opt, parts if rank == 0 else parts[:-1], total=total)
    except ValueError as error:
        result["mismatch"] = str(error)
    result["kept"] = all(torch.equal(before[name], buffer) for name, buffer in statistics(model).items())
    dist.destroy_process_group()
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What the two processes leave. Forked (this process has imported torch already)
    while it computes with one thread; spawned otherwise."""
    folder = str(tmp_path_factory.mktemp("ranks"))
    method = "fork" if torch.get_num_threads() == 1 else "spawn"
    context = mp.start_processes(_rank, args=(folder,), nprocs=2, join=False, start_method=method)
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=0.5):
            assert time.monotonic() < deadline, "the two processes did not finish within 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]


def test_two_processes_give_the_statistics_of_one_process_on_the_whole_batches(two_ranks):
    model, opt = network()
    recalibrate(model, opt, images())
    whole = statistics(model)
    for rank in two_ranks:
        assert rank["images"] == sum(SIZES)
        for name, buffer in whole.items():
            torch.testing.assert_close(rank["statistics"][name], buffer, rtol=1e-12, atol=1e-14, msg=name)
    # and they are not those of one process's part alone
    recalibrate(model, opt, [x[k:] for x, k in zip(images(), SPLITS)])
    assert not torch.allclose(statistics(model)["norm1d.running_var"], whole["norm1d.running_var"], rtol=1e-3)


def test_processes_with_different_numbers_of_batches_get_a_clear_error_not_a_hang(two_ranks):
    for rank in two_ranks:
        assert rank["mismatch"] == ("recalibrate: the processes gave different numbers of batches: at step 3, "
                                    "1 of 2 had one; give every process as many")
        assert rank["kept"]
