"""checkpoint.py in process: the fields of a file and how each is checked, every format
version read back as the current one (files built by hand, as each version wrote them),
every refusal naming what is wrong, and the round trips of a run's state (the checkpoint,
model_best without the optimizer's memory, for VISPA and the rival methods, ``peek``)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import FORMAT, VERSION, Checkpoint, CheckpointError
from config import Config
from models import BinaryLinear
from optim import STE, VISPA, BayesBiNN
from utils import files
from utils.run_dir import CALIBRATION_FIELDS, CSV_FIELDS, DEPLOYED_FIELDS

PATH = "results/r18/checkpoint.pth.tar"  # the name every message must carry; never opened
EPOCHS = 3


def settings(**changes):
    """A run's settings of 3 epochs (a warm-up of 1)."""
    return Config(**dict(dict(epochs=EPOCHS, warmup_epochs=1), **changes))


def row(epoch, columns=CSV_FIELDS):
    """One epoch's metrics, every column a number (1.5), in the given columns."""
    return {key: epoch if key == "epoch" else 1.5 for key in columns}


def version6(**changes):
    """The content of a format-6 file after 2 of 3 epochs, field by field (without its digest)."""
    content = {"format": FORMAT, "config": settings().to_dict(), "run": "r18", "run_id": "a1b2c3",
               "epoch": 2, "model": {"conv.weight": torch.ones(2, 2)},
               "optimizer": {"state": {0: {"M": torch.ones(2, 2)}}, "param_groups": [{"params": [0]}]},
               "best_prec1": 51.5, "best_epoch": 1, "history": [row(1), row(2)],
               "ranks": [{"rng": torch.zeros(3, dtype=torch.uint8)}], "log_offset": 120, "data_root": "/data",
               "threads": 2, "classes": None, "steps": 5, "version": 6}
    content.update(changes)
    return content


def version5(**changes):
    """Format 5: no class names."""
    content = version6(version=5)
    del content["classes"], content["steps"]
    content.update(changes)
    return content


def version4(**changes):
    """Format 4: the metrics' rows have no deployed network's columns."""
    before = [k for k in CSV_FIELDS if k not in DEPLOYED_FIELDS]
    return version5(**dict(dict(version=4, history=[row(1, before), row(2, before)]), **changes))


def version3(**changes):
    """Format 3: nor the calibration's."""
    before = [k for k in CSV_FIELDS if k not in DEPLOYED_FIELDS + CALIBRATION_FIELDS]
    return version5(**dict(dict(version=3, history=[row(1, before), row(2, before)]), **changes))


def version2(**changes):
    """Format 2: no run id, no thread count; the ranks kept the evaluation's generator state."""
    content = version3(version=2, ranks=[{"rng": torch.zeros(3, dtype=torch.uint8),
                                          "evaluation draws": torch.zeros(5, dtype=torch.uint8)}])
    del content["run_id"], content["threads"]
    content.update(changes)
    return content


def version1(**changes):
    """Format 1 (no "version" and no digest): the network, its distribution, the settings
    (with the run's name as "save") and the epoch."""
    content = {"format": FORMAT, "config": dict(settings(model="vgg16").to_dict(), save="vgg_run"),
               "epoch": 2, "model": {"conv.weight": torch.ones(2, 2)},
               "optimizer": {"state": {}, "param_groups": []}}
    content.update(changes)
    return content


def read_back(content, purpose="resumed", digest=True):
    """``from_file`` of a file holding ``content`` (with a fresh digest)."""
    return checkpoint.from_file(files.with_digest(content) if digest else content, PATH, purpose)


def refusal(content, purpose="resumed", digest=True):
    """The one-line message of the CheckpointError that reading ``content`` raises."""
    with pytest.raises(CheckpointError) as error:
        read_back(content, purpose, digest)
    message = str(error.value)
    assert "\n" not in message and PATH in message, message
    return message


# ---- the current version ---------------------------------------------------------------------------

def test_a_current_file_reads_back_field_by_field():
    state = read_back(version6())
    assert state.config == settings()
    assert (state.run, state.run_id, state.epoch, state.best_prec1, state.best_epoch) == ("r18", "a1b2c3", 2, 51.5, 1)
    assert state.history == [row(1), row(2)] and state.log_offset == 120
    assert (state.data_root, state.threads, state.classes, state.steps, state.version) == ("/data", 2, None, 5, 6)
    assert torch.equal(state.model["conv.weight"], torch.ones(2, 2))
    assert torch.equal(state.ranks[0]["rng"], torch.zeros(3, dtype=torch.uint8))


def test_to_file_writes_exactly_the_fields_of_the_current_version():
    state = read_back(version6())
    content = state.to_file()
    assert sorted(content) == sorted(version6())
    assert content["format"] == FORMAT and content["version"] == VERSION == 6
    assert content["config"] == settings().to_dict()
    plain = {k: v for k, v in content.items() if k not in ("model", "optimizer", "ranks")}
    assert plain == {k: v for k, v in version6().items() if k not in ("model", "optimizer", "ranks")}
    assert content["model"] is state.model and content["optimizer"] is state.optimizer


def test_the_class_names_of_a_run_on_images_of_ones_own_read_back():
    names = [f"class {i}" for i in range(100)]
    assert read_back(version6(classes=names)).classes == names
    assert read_back(version5()).classes is None  # older files hold none


def test_a_run_name_longer_than_a_new_run_may_have_reads_back():
    """New runs' names are at most 200 bytes; files of runs named before may be longer."""
    assert read_back(version6(run="b" * 230)).run == "b" * 230


def test_a_file_without_data_root_reads_as_none():
    content = version6()
    del content["data_root"]
    assert read_back(content).data_root is None


# ---- every version read as the current one ----------------------------------------------------------

@pytest.mark.parametrize("made", [version2, version3, version4, version5, version6])
def test_every_version_with_a_digest_reads_as_the_current_one(made):
    state = read_back(made())
    assert state.version == VERSION
    assert [sorted(r) for r in state.history] == [sorted(CSV_FIELDS)] * 2
    for i, r in enumerate(state.history, 1):
        assert r["epoch"] == i
        for key in CSV_FIELDS:
            if key != "epoch":  # what the file held is kept; the columns it did not have are empty
                assert r[key] == (1.5 if key in made()["history"][0] else None), (key, r[key])
    assert (state.run, state.epoch, state.best_prec1, state.best_epoch) == ("r18", 2, 51.5, 1)


def test_version_4_rows_get_empty_deployed_columns_and_keep_their_calibration():
    state = read_back(version4())
    assert all(r[key] is None for r in state.history for key in DEPLOYED_FIELDS)
    assert all(r[key] == 1.5 for r in state.history for key in CALIBRATION_FIELDS)


def test_version_3_rows_get_empty_calibration_and_deployed_columns():
    state = read_back(version3())
    assert all(r[key] is None for r in state.history for key in CALIBRATION_FIELDS + DEPLOYED_FIELDS)
    assert state.run_id == "a1b2c3" and state.threads == 2


def test_version_2_has_no_identity_no_thread_count_and_loses_the_evaluations_generator():
    state = read_back(version2())
    assert state.run_id is None and state.threads is None
    assert list(state.ranks[0]) == ["rng"]  # the evaluation draws are seeded by the epoch since format 3


def test_version_2_can_be_resumed():
    assert read_back(version2(), purpose="resumed").epoch == 2


def test_version_1_is_evaluated_with_its_run_name_and_no_metrics():
    state = read_back(version1(), purpose="evaluated", digest=False)
    assert state.config == settings(model="vgg16")  # "save" is not a setting any more
    assert (state.run, state.epoch, state.best_prec1, state.best_epoch) == ("vgg_run", 2, 0.0, 0)
    assert state.history is None and state.ranks == [{}] and state.log_offset == 0
    assert state.run_id is None and state.threads is None


@pytest.mark.parametrize("save", ["a/b", ".hidden", "", None])
def test_version_1_without_a_usable_run_name_is_called_format_1(save):
    settings = dict(version1()["config"], save=save)
    assert read_back(version1(config=settings), purpose="exported", digest=False).run == "format-1"


def test_version_1_is_read_without_a_digest():
    assert read_back(version1(), purpose="evaluated", digest=False).epoch == 2


# ---- refusals: versions ------------------------------------------------------------------------------

def test_version_1_cannot_be_resumed():
    message = refusal(version1(), purpose="resumed", digest=False)
    assert "checkpoint format 1" in message and "it can be evaluated, not resumed" in message


@pytest.mark.parametrize("purpose", ["evaluated", "exported", "resumed"])
def test_a_version_1_resnet18_is_refused_for_every_purpose(purpose):
    settings = dict(version1()["config"], model="resnet18")
    message = refusal(version1(config=settings), purpose=purpose, digest=False)
    assert "ResNet18 of checkpoint format 1" in message and "ReLU after the stem" in message
    assert f"cannot be {purpose}" in message


def test_a_newer_version_is_refused_with_both_versions():
    message = refusal(version6(version=VERSION + 1))
    assert f"newer version of this program (checkpoint format {VERSION + 1}; this one reads up to {VERSION})" \
        in message


@pytest.mark.parametrize("version", ["5", 5.0, True, None])
def test_a_version_that_is_not_a_whole_number_is_refused(version):
    assert f"its format version {version!r} is not a version of this program's files" in \
        refusal(version6(version=version))


@pytest.mark.parametrize("version", [0, -1])
def test_a_version_below_1_is_refused(version):
    assert f"its format version {version} is not a version" in refusal(version6(version=version), digest=False)


# ---- refusals: the digest and missing fields ------------------------------------------------------------

def test_a_file_without_its_digest_is_refused():
    assert "has no content digest" in refusal(version6(), digest=False)


def test_a_file_changed_after_its_digest_is_refused_as_damaged():
    content = files.with_digest(version6())
    content["epoch"] = 1
    with pytest.raises(CheckpointError, match="is damaged: its content does not match the digest"):
        checkpoint.from_file(content, PATH, "resumed")


def test_a_file_without_settings_is_refused_by_name():
    content = version6()
    del content["config"]
    assert "is not a complete checkpoint of this program: it has no 'config'" in refusal(content)


@pytest.mark.parametrize("field", ["run", "epoch", "model", "optimizer", "best_prec1", "best_epoch", "history",
                                   "ranks", "log_offset"])
def test_a_missing_field_is_named(field):
    content = version6()
    del content[field]
    assert f"it has no {field!r}" in refusal(content)


def test_every_missing_field_is_named_at_once():
    content = version6()
    del content["epoch"], content["ranks"]
    assert "it has no 'epoch', 'ranks'" in refusal(content)


# ---- refusals: each field's type and range --------------------------------------------------------------

BAD = [
    # settings
    (dict(config=["resnet18"]), "its settings are not a dict"),
    (dict(config=dict(settings().to_dict(), colour="red")), "its settings cannot be read: unknown settings ['colour']"),
    (dict(config=dict(settings().to_dict(), K=-1)), "its settings cannot be read: K must be >= 0, got -1"),
    (dict(config=dict(settings().to_dict(), K="8")), "its settings cannot be read: K must be a int, got '8'"),
    # epoch: a whole number from 0 to the run's epochs
    (dict(epoch=-1), "epoch -1 is not a whole number from 0 to the run's 3 epochs"),
    (dict(epoch=4), "epoch 4 is not a whole number from 0 to the run's 3 epochs"),
    (dict(epoch=2.0), "epoch 2.0 is not a whole number"),
    (dict(epoch=True), "epoch True is not a whole number"),
    # run name and id
    (dict(run="a/b"), "its run name 'a/b' is not a folder name"),
    (dict(run=".r18"), "its run name '.r18' is not a folder name"),
    (dict(run="r\n18"), "its run name 'r\\n18' is not a folder name"),
    (dict(run=18), "its run name 18 is not a folder name"),
    (dict(run_id="a1-b2"), "its run id 'a1-b2' is not a word of letters and digits"),
    (dict(run_id=12), "its run id 12 is not a word of letters and digits"),
    # the best epoch and its top-1
    (dict(best_epoch=3), "best epoch 3 is not a whole number from 0 to its epoch 2"),
    (dict(best_epoch=-1), "best epoch -1 is not a whole number from 0 to its epoch 2"),
    (dict(best_epoch=1.0), "best epoch 1.0 is not a whole number"),
    (dict(best_prec1=100.5), "best top-1 100.5 is not a percentage"),
    (dict(best_prec1=-0.5), "best top-1 -0.5 is not a percentage"),
    (dict(best_prec1=math.nan), "best top-1 nan is not a percentage"),
    (dict(best_prec1="51.5"), "best top-1 '51.5' is not a percentage"),
    (dict(best_prec1=True), "best top-1 True is not a percentage"),
    # the metrics: one row per finished epoch, numbered, finite numbers
    (dict(history=[row(1)]), "its metrics have 1 rows for 2 finished epochs"),
    (dict(history="rows"), "its metrics have no rows for 2 finished epochs"),
    (dict(history=[row(1), {"epoch": 2}]), "row 2 of its metrics does not have the columns epoch, lr, "),
    (dict(history=[row(1), row(3)]), "row 2 of its metrics holds {'epoch': 3"),
    (dict(history=[row(1), dict(row(2), lr=math.inf)]), "row 2 of its metrics holds"),
    (dict(history=[dict(row(1), train_loss=None), row(2)]), "row 1 of its metrics holds"),
    (dict(history=[dict(row(1), val_ece="1.5"), row(2)]), "row 1 of its metrics holds"),
    # where the log's best line starts
    (dict(log_offset=-1), "log offset -1 is not a whole number of bytes"),
    (dict(log_offset=1.5), "log offset 1.5 is not a whole number of bytes"),
    # the network and the optimizer
    (dict(model=[torch.ones(1)]), "its network is not a state_dict of named tensors"),
    (dict(model={"w": [1.0]}), "its network is not a state_dict of named tensors"),
    (dict(model={0: torch.ones(1)}), "its network is not a state_dict of named tensors"),
    (dict(optimizer={"state": {}}), "its optimizer state is not an optimizer's (no 'state' and 'param_groups')"),
    (dict(optimizer={"state": [], "param_groups": []}), "its optimizer state is not an optimizer's"),
    (dict(optimizer=None), "its optimizer state is not an optimizer's"),
    # the ranks' random states
    (dict(ranks=[]), "it holds no random states of its ranks"),
    (dict(ranks={"rng": 1}), "it holds no random states of its ranks"),
    (dict(ranks=[{}, "rank 1"]), "it holds no random states of its ranks"),
    # the data folder and the thread count
    (dict(data_root=3), "its data folder 3 is not a path"),
    (dict(threads=0), "its thread count 0 is not a whole number from 1 to 1024"),
    (dict(threads=1025), "its thread count 1025 is not a whole number from 1 to 1024"),
    (dict(threads=2.0), "its thread count 2.0 is not a whole number from 1 to 1024"),
    # the class names (of images of one's own)
    (dict(steps=0), "its steps per epoch 0 are not a whole number from 1"),
    (dict(steps=2.5), "its steps per epoch 2.5 are not a whole number from 1"),
    (dict(classes="cat"), "its class names are not 100 different names"),
    (dict(classes=["cat", "dog"]), "its class names are not 100 different names"),
    (dict(classes=["cat"] * 100), "its class names are not 100 different names"),
    (dict(classes=[f"c{i}" for i in range(99)] + [7]), "its class names are not 100 different names"),
]


@pytest.mark.parametrize("changes,expected", BAD, ids=[f"{next(iter(c))}={c[next(iter(c))]!r}"[:40] for c, _ in BAD])
def test_an_impossible_field_is_refused_with_what_is_wrong(changes, expected):
    message = refusal(version6(**changes))
    assert expected in message, message
    assert message.startswith(PATH)


@pytest.mark.parametrize("made", [version2, version3, version4, version5, version6])
def test_a_file_with_a_digest_must_hold_its_metrics(made):
    assert "metrics" in refusal(made(history=None))


def test_the_fields_of_an_older_version_are_checked_too():
    assert "epoch 4 is not a whole number" in refusal(version2(epoch=4))
    assert "its settings are not a dict" in refusal(version1(config="vgg16"), purpose="evaluated", digest=False)


def test_read_refuses_a_file_that_is_not_ours(tmp_path):
    path = str(tmp_path / "theirs.pth.tar")
    torch.save({"state_dict": {}, "epoch": 500}, path)
    with pytest.raises(CheckpointError) as error:
        checkpoint.read(path, purpose="resumed")
    assert str(error.value) == f"{path} is not a checkpoint of this program; only our own checkpoints can be resumed"


def test_read_refuses_a_missing_file_as_a_checkpoint_error(tmp_path):
    path = str(tmp_path / "none.pth.tar")
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {path}"):
        checkpoint.read(path)


def test_write_into_a_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        checkpoint.write(version6(), str(tmp_path / "missing" / "checkpoint.pth.tar"))


# ---- a run's state, written and read back -------------------------------------------------------------

def trained(method, seed=0, steps=1):
    """A tiny network and its optimizer of ``method`` after ``steps`` steps: after one, the
    optimizer has its memory (momenta, Adam's moments) beside the distribution."""
    torch.manual_seed(seed)
    model = nn.Sequential(BinaryLinear(4, 3), nn.BatchNorm1d(3))
    if method == "vispa":
        opt = VISPA(model.parameters(), lr=0.1, K=2, S=4.0, seed=seed)
    elif method == "bayesbinn":
        opt = BayesBiNN(model.parameters(), train_set_size=8, lr=0.1, seed=seed)
    else:
        opt = STE(model.parameters(), lr=0.1, seed=seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def state_of(model, opt, method):
    return Checkpoint(config=settings(method=method), run="r18", run_id="a1b2c3", epoch=1,
                      model=model.state_dict(), optimizer=opt.state_dict(), best_prec1=12.5, best_epoch=1,
                      history=[row(1)], ranks=[{}], log_offset=0, data_root="/data", threads=1)


# What each method's distribution is (kept in model_best), and its memory (left out there).
DISTRIBUTION = {"vispa": {"M", "Z"}, "bayesbinn": {"lamda", "mu"}, "ste": {"latent"}}
MEMORY = {"vispa": {"M_momentum", "Z_momentum"}, "bayesbinn": {"momentum", "step"},
          "ste": {"exp_avg", "exp_avg_sq", "step"}}
METHODS = sorted(DISTRIBUTION)


@pytest.mark.parametrize("method", METHODS)
def test_the_checkpoint_has_the_optimizers_memory_and_model_best_only_the_distribution(method):
    model, opt = trained(method)
    state = state_of(model, opt, method)
    assert state.has_momenta
    binary = state.optimizer["state"][0]  # the BinaryLinear's weight, the first parameter
    assert set(binary) == DISTRIBUTION[method] | MEMORY[method]
    assert "momentum_buffer" in state.optimizer["state"][1]  # its scale alpha, a real parameter (SGD)

    best = state.without_momenta()
    assert not best.has_momenta
    assert set(best.optimizer["state"][0]) == DISTRIBUTION[method]
    assert all(best.optimizer["state"][i] == {} for i in (1, 2, 3))  # alpha, BatchNorm's weight and bias
    for key in DISTRIBUTION[method]:
        assert best.optimizer["state"][0][key] is binary[key]
    assert best.optimizer["param_groups"] == state.optimizer["param_groups"]
    assert best.optimizer["generator"] is state.optimizer["generator"]
    assert best.model is state.model and (best.epoch, best.history) == (state.epoch, state.history)
    assert set(state.optimizer["state"][0]) == DISTRIBUTION[method] | MEMORY[method]  # left as it was


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_and_model_best_round_trip_through_their_files(method, tmp_path):
    model, opt = trained(method)
    state = state_of(model, opt, method)
    for name, written in (("checkpoint.pth.tar", state), ("model_best.pth.tar", state.without_momenta())):
        checkpoint.write(written.to_file(), str(tmp_path / name))
        back = checkpoint.read(str(tmp_path / name), purpose="resumed")
        assert back.has_momenta == written.has_momenta
        assert (back.config, back.run, back.epoch, back.history) == (written.config, "r18", 1, [row(1)])
        for index, entry in written.optimizer["state"].items():
            assert set(back.optimizer["state"][index]) == set(entry)
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(back.optimizer["state"][index][key]), torch.as_tensor(value))
        assert all(torch.equal(back.model[k], v) for k, v in written.model.items())
        assert torch.equal(back.optimizer["generator"]["state"], written.optimizer["generator"]["state"])


@pytest.mark.parametrize("method", METHODS)
def test_model_best_restores_the_distribution_and_starts_the_memory_afresh(method):
    model, opt = trained(method)
    best = state_of(model, opt, method).without_momenta()
    fresh_model, fresh = trained(method, seed=1, steps=0)  # another network, as a new process builds it
    assert not torch.equal(fresh_model[0].weight, model[0].weight)
    fresh.load_state_dict(best.optimizer)
    restored = fresh.state_dict()["state"][0]
    for key in DISTRIBUTION[method]:
        assert torch.equal(restored[key], best.optimizer["state"][0][key])
    for key in set(restored) & MEMORY[method] - {"step"}:
        assert not restored[key].any(), key  # afresh
    assert torch.equal(fresh_model[0].weight, model[0].weight)  # the same mean network in the layer
    with fresh.sampled_params(train=True):  # and it trains on
        F.cross_entropy(fresh_model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    fresh.step()


def test_peek_reads_the_plain_fields_of_a_written_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth.tar")
    checkpoint.write(read_back(version6()).to_file(), path)
    assert checkpoint.peek(path) == {"format": FORMAT, "version": VERSION, "epoch": 2, "epochs": EPOCHS,
                                     "run": "r18", "run_id": "a1b2c3", "data_root": "/data",
                                     "config": settings().to_dict()}


def test_peek_gives_none_for_what_a_file_lacks_and_for_an_unreadable_file(tmp_path):
    other = str(tmp_path / "other.pth")
    torch.save({"state_dict": {}}, other)
    assert checkpoint.peek(other) == dict.fromkeys(("format", "version", "epoch", "epochs", "run", "run_id",
                                                                "data_root", "config"))
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    assert checkpoint.peek(str(text)) is None
    assert checkpoint.peek(str(tmp_path / "missing.pth")) is None


def test_is_ours_tells_our_files_by_their_format():
    assert checkpoint.is_ours(version6()) and checkpoint.is_ours(version1())
    assert not checkpoint.is_ours({"state_dict": {}}) and not checkpoint.is_ours(["format"])
    assert not checkpoint.is_ours({"format": "vispa-binary-network"})
