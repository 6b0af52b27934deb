"""One source for each rule: TrainConfig() is the fast recipe, recipes resolve in one place (GPU
values on CUDA), a --config file sits between the recipe and the flags, help lives in fields."""
import argparse
import json

import pytest
import torch

from c40.config import RECIPES, TrainConfig, add_config_flags, config_from_args
from c40.errors import ConfigError


def parse(*argv):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(list(argv)))


def test_the_defaults_are_the_fast_recipe():
    assert TrainConfig(device="cpu") == TrainConfig.from_recipe("fast", device="cpu")


def test_gpu_values_apply_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only Ray head ...
    head = TrainConfig.from_recipe("fast", device="cuda")               # ... configuring GPU workers
    assert (head.device, head.batch_size) == ("cuda", RECIPES["fast"]["cuda"]["batch_size"])
    assert TrainConfig.from_recipe("fast").batch_size == 128           # auto on a CPU machine
    cpu = TrainConfig.from_recipe("best", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = TrainConfig.from_recipe("best", device="cuda")
    assert (cpu.batch_size, cpu.lr) == (256, 0.28)
    assert (gpu.batch_size, gpu.lr) == (RECIPES["best"]["cuda"]["batch_size"], RECIPES["best"]["cuda"]["lr"])
    assert gpu.epochs == cpu.epochs == 200 and gpu.arch == cpu.arch == "resnet"
    assert TrainConfig.from_recipe("best", device="cuda", lr=0.1).lr == 0.1  # overrides win
    assert TrainConfig.from_recipe("reference", device="cuda").batch_size == 128  # the same everywhere


def test_config_file_between_recipe_and_flags(tmp_path):
    f = tmp_path / "best_config.json"
    f.write_text(json.dumps({"recipe": "best", "lr": 0.3, "dropout": 0.1, "epochs": 7}))
    cfg = parse("--config", str(f), "--epochs", "3", "--device", "cpu")
    assert (cfg.recipe, cfg.lr, cfg.dropout, cfg.epochs, cfg.ema) == ("best", 0.3, 0.1, 3, True)


@pytest.mark.parametrize("content,message", [(None, "No such file"), ("{", "not JSON"),
                                             ('{"lr": 0.1, "lrr": 2}', "unknown field(s) lrr"),
                                             ("[1]", "expected a JSON object")])
def test_bad_config_file_is_one_line(tmp_path, content, message):
    f = tmp_path / "c.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse("--config", str(f))
    assert "\n" not in str(e.value)


def test_every_flag_has_help():
    p = argparse.ArgumentParser()
    add_config_flags(p)
    missing = [a.dest for a in p._actions if a.dest != "help" and not a.help]
    assert missing == []


def test_tta_modes_from_flags_files_and_old_checkpoints(tmp_path):
    assert TrainConfig().tta == "flip-shift"
    assert [parse(*a).tta for a in (["--tta"], ["--no-tta"], ["--tta", "off"], ["--tta", "flip-shift"])] \
        == ["flip", "off", "off", "flip-shift"]
    # checkpoints and config files written before the modes said true/false
    assert (TrainConfig(tta=True).tta, TrainConfig(tta=False).tta) == ("flip", "off")
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"tta": False}))
    assert parse("--config", str(f)).tta == "off"
    with pytest.raises(ConfigError, match="unknown tta 'shift' \\(choose from off, flip, flip-shift\\)"):
        TrainConfig(tta="shift")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse("--tta", "mirror")


def test_muon_only_where_it_was_measured(monkeypatch):
    """fast on a CPU trains the whitened strided net with Muon and 8x BatchNorm-bias rate
    (measured: 5 epochs reach 85%; the GPU fast was measured on plain-SGD strided);
    best with Muon at batch 256 on a CPU (measured: 93.24% in 200 epochs vs 93.13% plain) and
    at batch 512 on a GPU (measured on the CPU at 42 epochs: as batch 256); every other recipe,
    and fast on a GPU, stay with the plain SGD they were measured with."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fast = TrainConfig.from_recipe("fast", device="cpu")
    assert (fast.arch, fast.muon_lr, fast.bn_bias_lr, fast.epochs) == ("strided_whiten", 0.05, 8.0, 5)
    assert TrainConfig.from_recipe("fast", device="cuda").arch == "strided"
    best = TrainConfig.from_recipe("best", device="cpu")
    assert (best.batch_size, best.lr, best.muon_lr, best.bn_bias_lr, best.ema_decay) == (
        256, 0.28, 0.07, 8.0, 0.998)
    best_gpu = TrainConfig.from_recipe("best", device="cuda")
    assert (best_gpu.batch_size, best_gpu.lr, best_gpu.muon_lr, best_gpu.bn_bias_lr,
            best_gpu.ema_decay) == (512, 0.4, 0.1, 8.0, 0.996)
    for recipe, device in [("fast", "cuda"), ("dilated", "cpu"), ("reference", "cpu")]:
        cfg = TrainConfig.from_recipe(recipe, device=device)
        assert (cfg.muon_lr, cfg.bn_bias_lr) == (0.0, 1.0), recipe
