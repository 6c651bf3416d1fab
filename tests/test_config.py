"""Config: YAML + dotted overrides, type checks, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf2lora.config import ConfigError, ExperimentConfig, load_config
from pf2lora.methods import check


def test_defaults_are_valid_and_paper_like() -> None:
    cfg = load_config()
    assert cfg.algorithms == ["pf2lora", "homlora"]
    assert (cfg.lora.rank, cfg.lora.personal_rank) == (8, 2)
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.train.hypergradient == "finite_difference"
    assert (cfg.train.local_steps, cfg.train.batch_size) == (10, 16)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  rounds: 4\nlora:\n  rank: 6\n")
    cfg = load_config(path, ["train.rounds=7", "personal_rank=3", "algorithm=homlora", "lora.target_modules=[query]"])
    assert cfg.seed == 3 and cfg.train.rounds == 7 and cfg.lora.rank == 6
    assert cfg.lora.personal_rank == 3  # a unique leaf name resolves to its dotted path
    assert cfg.algorithms == ["homlora"]
    assert cfg.lora.target_modules == ["query"]
    assert load_config(None, ["algorithms=pf2lora,homlora"]).algorithms == ["pf2lora", "homlora"]
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    assert load_config(None, ["model.dropout=null"]).model.dropout is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm=fedsgd", "unknown method 'fedsgd'"),
        ("lora.rank=0", "lora.rank must be > 0"),
        ("lora.rank=-2", "lora.rank must be > 0"),
        ("lora.personal_rank=8", r"personal_rank \(8\) must be smaller than lora.rank \(8\)"),
        ("data.heterogeneity=1.5", r"heterogeneity must be in \[0, 1\]"),
        ("data.heterogeneity=-0.1", r"heterogeneity must be in \[0, 1\]"),
        ("train.hypergradient=newton", "unknown train.hypergradient"),
        ("train.rounds=two", "train.rounds: expected an integer"),
        ("train.rounds=1.5", "train.rounds: expected an integer"),
        ("train.nope=1", "unknown config key 'train.nope'"),
        ("nope=1", "unknown config key 'nope'"),
        ("data.num_clients=0", "num_clients must be >= 1"),
        ("lora.head=both", "lora.head must be shared or personal"),
        ("data.partition=random", "unknown data.partition"),
        ("train.client_fraction=0", r"client_fraction must be in \(0, 1\]"),
        ("rounds", "not of the form key=value"),
        ("data.dataset=file", "needs data.path"),
        ("train.compression=zip", "train.compression must be none, fp16 or bf16"),
        ("train.client_state=cloud", "train.client_state must be memory or disk"),
        ("model.device=tpu", "model.device must be auto, cpu, cuda or cuda:N"),
        ("model.dtype=half", "model.dtype must be auto, float32, bfloat16 or float16"),
        ("task.eval_tokens=0", "task.eval_tokens must be >= 1"),
        ("train.fd_epsilon=0", "train.fd_epsilon must be > 0"),
    ],
)
def test_bad_values_give_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        check(load_config(None, [override]))
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_repository_configs_are_valid() -> None:
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        assert isinstance(load_config(path), ExperimentConfig)


def test_per_method_settings_merge_for_that_method_only() -> None:
    cfg = load_config(
        None, ["train.lr=0.002", "per_method.pf2lora.train.lr=0.001", "per_method.perfedavg.perfedavg.alpha=0.5"]
    )
    assert cfg.for_method("pf2lora").train.lr == 0.001
    assert cfg.for_method("homlora").train.lr == 0.002
    assert cfg.for_method("perfedavg").perfedavg.alpha == 0.5 and cfg.perfedavg.alpha == 0.01
    assert cfg.for_method("pf2lora").train.rounds == cfg.train.rounds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("per_method.fedprox.train.lr=0.1", "per_method: unknown method 'fedprox'"),
        ("per_method.pf2lora.data.heterogeneity=0.1", "data cannot differ between methods"),
        ("per_method.pf2lora.train.lr=-1", "train.lr must be > 0"),
        ("per_method.pf2lora.train.lrr=1", "unknown config key 'train.lrr'"),
        ("per_method.pf2lora=3", "per_method.pf2lora: expected a mapping"),
    ],
)
def test_bad_per_method_settings(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(load_config(None, [override]))
    assert message in str(err.value)


def test_a_short_key_naming_two_settings_is_refused(monkeypatch) -> None:
    import pf2lora.config as config

    paths = config._leaf_paths(ExperimentConfig)
    shared = {k for k, v in paths.items() if len(v) > 1}
    assert shared == {"name", "r_min", "r_max", "ranks"}  # HETLoRA's and FlexLoRA's ranks: dotted paths only
    with pytest.raises(ConfigError, match=r"config key 'r_min' is ambiguous \(hetlora.r_min or flexlora.r_min\)"):
        load_config(None, ["r_min=2"])
    monkeypatch.setattr(config, "_leaf_paths", lambda cls: {**paths, "rank": ["lora.rank", "pfedlora.rank"]})
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rank=4"])
    assert "config key 'rank' is ambiguous (lora.rank or pfedlora.rank): use the dotted path" in str(err.value)
    assert load_config(None, ["lora.rank=4"]).lora.rank == 4
