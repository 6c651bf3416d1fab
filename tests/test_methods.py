"""The method registry: every method listed with its line, unknown names and mixed families
refused with one line (exit 2), a user's method registered from outside the package."""

from __future__ import annotations

import pytest

from pf2lora import methods
from pf2lora.cli import main
from pf2lora.compare import plan
from pf2lora.config import ConfigError, load_config

BUILT_IN = [
    *("pf2lora", "homlora", "hetlora", "perfedavg", "centralized"),  # the paper's
    *("fedsa_lora", "ffa_lora", "flexlora", "feddpa", "fedex_lora"),  # the newer federated LoRA methods
    *("pfedlora", "local", "fedavg"),  # model-heterogeneous
]


def test_pf2lora_methods_lists_every_method_with_its_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == methods.names() and methods.names()[: len(BUILT_IN)] == BUILT_IN
    for line, name in zip(lines, methods.names(), strict=True):
        assert methods.get(name).description in line


def test_unknown_method_is_one_line_with_the_known_ones(tmp_path, capsys):
    assert main(["run", "algorithms=[pf2lora,fedprox]", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf2lora: error: unknown method 'fedprox' (choose from pf2lora, homlora,")
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_families_do_not_mix_and_own_model_methods_classify_only():
    with pytest.raises(ConfigError, match="train each client's own model"):
        methods.check(load_config(None, ["algorithms=[pfedlora,homlora]"]))
    with pytest.raises(ConfigError, match="classify only"):
        methods.check(load_config(None, ["algorithms=[local]", "task.name=qa"]))
    with pytest.raises(ConfigError, match="centralized pools every client's data"):
        methods.check(load_config(None, ["algorithms=[centralized]", "engine=flower"]))


def test_a_method_entry_is_checked_when_made():
    build = methods.get("homlora").build
    with pytest.raises(ValueError, match="family"):
        methods.Method("mine", "adapter", "a line", build)
    with pytest.raises(ValueError, match="one-line"):
        methods.Method("mine", "lora", "two\nlines", build)
    with pytest.raises(ValueError, match="lower-case"):
        methods.Method("My-Method", "lora", "a line", build)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("homlora", "lora", "a line", build))


def test_a_user_method_registers_runs_its_own_checks_and_stays_in_this_process(tmp_path):
    seen = []

    def check(cfg):
        seen.append(cfg.train.lr)
        if cfg.train.lr > 1:
            raise ConfigError("mine: train.lr must be <= 1")

    def build(cfg, base, task):  # defined here, outside the package, as a user's would be
        return methods.get("homlora").build(cfg, base, task)

    mine = methods.Method("mine", "lora", "HOMLoRA under another name", build, check=check)
    methods.register(mine)
    try:
        assert methods.get("mine") is mine and "mine" in methods.names("lora")
        methods.check(load_config(None, ["algorithms=[mine,homlora]", "per_method.mine.train.lr=0.5"]))
        assert seen == [0.5]  # with its per_method settings merged in
        with pytest.raises(ConfigError, match="train.lr must be <= 1"):
            methods.check(load_config(None, ["algorithms=[mine]", "train.lr=2"]))
        grid = plan(None, ["algorithms=homlora,mine"], [], [], [], None, None)
        from pf2lora.compare import execute

        with pytest.raises(ConfigError, match="mine: methods registered from your own code"):
            execute(grid, tmp_path / "grid", jobs=2)
        assert not (tmp_path / "grid").exists()  # refused before anything was prepared or written
    finally:
        methods.unregister("mine")
    assert "mine" not in methods.names()
