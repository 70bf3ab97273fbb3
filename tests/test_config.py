"""The run config: the paper's recipe as its defaults, the recipes by name, the options
made from it, the run-name rule of the benchmark scripts."""
from dataclasses import fields, replace

import pytest

import config
from config import RECIPES, Config, number, run_name, settings_on_command_line


def test_the_defaults_are_the_papers_recipe():
    """The paper's recipe (docs/recipes.md): K=8, S=100, L=40, lr 0.1, 5 warm-up epochs then cosine, momentum
    0.9, weight decay 5e-4, batch 256, 500 epochs, the full-width networks."""
    c = Config()
    assert (c.K, c.scale, c.L, c.lr, c.warmup_epochs, c.lr_decay, c.momentum, c.wd, c.batch_size,
            c.epochs, c.width, c.projection) == (8, 100.0, 40, 0.1, 5, "cos", 0.9, 5e-4, 256, 500, 64, "none")
    assert RECIPES["resnet18_1w32a_cifar100"] == c
    for model in ("vgg16", "resnet18"):
        for dataset in ("cifar100", "cifar10"):
            recipe = RECIPES[f"{model}_1w32a_{dataset}"]
            assert (recipe.model, recipe.dataset) == (model, dataset)
            assert replace(recipe, model="resnet18", dataset="cifar100") == c


@pytest.mark.parametrize("name, model", [("vgg_small_1w1a_cifar10", "vgg_small"),
                                         ("resnet18_1w1a_cifar10", "resnet18_1w1a")])
def test_the_1w1a_recipes_are_the_authors(name, model):
    """docs/recipes.md, the 1W1A rows: K=4, S=100, L=40, lr 0.5, weight decay 1e-5, 600 epochs, batch
    256, CIFAR-10, the paper's widths (VGG-Small's first layer is 128 wide)."""
    r = RECIPES[name]
    assert (r.model, r.dataset, r.K, r.scale, r.L, r.lr, r.wd, r.epochs, r.batch_size, r.warmup_epochs,
            r.momentum) == (model, "cifar10", 4, 100.0, 40, 0.5, 1e-5, 600, 256, 5, 0.9)
    assert r.width == (128 if model == "vgg_small" else 64)


def test_the_width_defaults_to_the_papers_network():
    assert Config(model="vgg_small").width == 128 and Config(model="alexnet_1w1a", dataset="imagenet").width == 96
    assert Config(model="vgg_small", width=16).width == 16


def test_the_options_are_made_from_the_config():
    import argparse
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, RECIPES["vgg16_1w32a_cifar10"])
    assert config.from_args(parser.parse_args([])) == RECIPES["vgg16_1w32a_cifar10"]
    parsed = config.from_args(parser.parse_args(["-K", "4", "--scale", "25", "--bf16", "--model",
                                                 "resnet18_1w32a_cifar"]))
    assert (parsed.K, parsed.scale, parsed.bf16, parsed.model) == (4, 25.0, True, "resnet18")
    assert len(parser._actions) == 1 + len(fields(Config))  # --help and one option per setting


@pytest.mark.parametrize("argv, message", [
    (["-K", "-1"], "argument -K: must be >= 0, got -1"),
    (["-L", "0"], "argument -L: must be >= 1, got 0"),
    (["--scale", "0"], "argument --scale/-scale: must be > 0, got 0"),
    (["--scale", "inf"], "argument --scale/-scale: must be a finite number, got inf"),
    (["-b", "1"], "argument -b/--batch-size/--batch_size: must be >= 2, got 1"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--lr", "-0.1"], "argument --lr: must be >= 0, got -0.1"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    # beyond float32's range a step ends in a traceback, not a divergence the run reports
    (["--lr", "1e39"], "argument --lr: must be <= 1000000.0, got 1e39"),
    (["--wd", "1e39"], "argument --wd: must be <= 1000000.0, got 1e39"),
    (["--method-lr", "1e39"], "argument --method-lr/--method_lr: must be <= 1000000.0, got 1e39"),
    (["--temperature", "1e-320"], "argument --temperature: must be >= 1e-30, got 1e-320"),
    (["--seed", "123456789012345678901234567890"], "argument --seed: must be <= 9223372036854775807"),
    (["--seed", "-3"], "argument --seed: must be >= 0, got -3"),
    (["--model", "resnet50"], "argument --model: unknown model 'resnet50'; choose one of: alexnet_1w1a"),
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--warmup_epochs", "-1"], "argument --warmup-epochs/--warmup_epochs: must be >= 0, got -1"),
    (["--eval_batch_size", "0"], "argument --eval-batch-size/--eval_batch_size: must be >= 1, got 0"),
])
def test_invalid_values_are_refused_by_the_options(argv, message, capsys):
    import argparse
    parser = argparse.ArgumentParser(prog="main.py")
    config.add_arguments(parser, Config())
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_settings_on_the_command_line_are_those_typed_whatever_their_value():
    assert settings_on_command_line(["--resume", "x", "-K", "8", "--bf16", "--data_root", "d"]) == {"K", "bf16"}
    assert settings_on_command_line(["--evaluate", "f.pth"]) == set()


def test_a_checkpoints_settings_round_trip_and_unknown_ones_are_refused():
    c = Config(model="vgg16", width=8, seed=3)
    assert Config.from_dict(c.to_dict()) == c
    assert Config.from_dict({"model": "vgg16"}) == Config(model="vgg16")  # older files: defaults
    with pytest.raises(ValueError, match=r"unknown settings \['colour'\]"):
        Config.from_dict(dict(c.to_dict(), colour="blue"))


@pytest.mark.parametrize("value, written", [(100.0, "100"), (0.1, "0.1"), (5e-4, "5e-4"), (1e-5, "1e-5"),
                                            (0.5, "0.5"), (0.05, "0.05"), (8, "8"), ("cos", "cos")])
def test_numbers_are_written_as_the_authors_write_them(value, written):
    assert number(value) == written


def test_run_names_state_the_recipe_and_every_setting_that_differs_from_it():
    assert run_name("resnet18_1w32a_cifar100", Config(), 2020) == \
        "resnet18_1w32a_cifar100_seed=2020_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500"
    changed = replace(RECIPES["vgg16_1w32a_cifar10"], K=2, L=2, epochs=2, width=4, batch_size=64,
                      warmup_epochs=1, bf16=True, eval_batch_size=50, seed=7, workers=1)
    assert run_name("vgg16_1w32a_cifar10", changed) == (
        "vgg16_1w32a_cifar10_seed={seed}_benchmark_K=2_S=100_L=2_wd=5e-4_lr=0.1_cos_epochs=2"
        "_width=4_batch=64_warmup=1_bf16=True")  # what does not change the function is not named


def test_every_option_of_several_words_takes_hyphens_and_underscores():
    """Hyphens are the documented spelling; the authors' underscores are accepted too."""
    from main import parse_args
    hyphens, _, _ = parse_args(["--data-root", "d", "--results-dir", "r", "--lr-decay", "constant",
                                "--warmup-epochs", "2", "--eval-batch-size", "7", "--virtual-ranks", "2"])
    underscores, _, _ = parse_args(["--data_root", "d", "--results_dir", "r", "--lr_decay", "constant",
                                    "--warmup_epochs", "2", "--eval_batch_size", "7", "--virtual_ranks", "2"])
    assert vars(hyphens) == vars(underscores)
    assert (hyphens.data_root, hyphens.results_dir, hyphens.lr_decay, hyphens.warmup_epochs,
            hyphens.eval_batch_size, hyphens.virtual_ranks) == ("d", "r", "constant", 2, 7, 2)
