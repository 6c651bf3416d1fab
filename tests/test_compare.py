"""`pf2lora compare`: the grid, its validation, the table built from the runs, and a real run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pf2lora import compare
from pf2lora.cli import main
from pf2lora.config import ConfigError

TINY = [
    "data.num_clients=2",
    "data.max_examples=48",
    "data.max_test_examples=16",
    "train.rounds=1",
    "train.local_steps=1",
    "train.batch_size=4",
    "model.max_length=24",
]


def test_grid_rows_columns_and_run_configs() -> None:
    grid = compare.plan(
        None,
        ["algorithms=pf2lora,homlora", "heterogeneity=0.6,1.0", "seeds=0,1", "rounds=3"],
        ablations=["bilevel"],
        variants=["perfedavg perfedavg.hessian=exact"],
    )
    labels = [r.label for r in grid.rows]
    assert labels == [
        "pf2lora",
        "homlora",
        "pf2lora (train.hypergradient=joint)",
        "perfedavg (perfedavg.hessian=exact)",
    ]
    assert [c.label for c in grid.columns] == ["h=0.6", "h=1"]
    assert len(grid.runs) == 4 * 2 * 2
    for row, column, seed, cfg in grid.runs:
        assert cfg.algorithms == [row.algorithm]
        assert cfg.data.heterogeneity == column.heterogeneity and cfg.seed == seed and cfg.train.rounds == 3
        if row.algorithm == "pf2lora" and row.overrides:
            assert cfg.train.hypergradient == "joint"
        if row.algorithm == "perfedavg":
            assert cfg.perfedavg.hessian == "exact"


def test_sweep_is_one_row_per_value_and_combination() -> None:
    grid = compare.plan(None, ["algorithms=pf2lora"], sweeps=["personal_rank=1,2,4", "lower_lr=0.5,1.0"])
    assert len(grid.rows) == 6
    ranks = sorted({cfg.lora.personal_rank for _, _, _, cfg in grid.runs})
    assert ranks == [1, 2, 4]
    assert {cfg.train.lower_lr for _, _, _, cfg in grid.runs} == {0.5, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"items": ["algorithms=pf2lora,fedprox"]}, "unknown method 'fedprox'"),
        ({"items": ["seeds=0,x"]}, "seeds: expected integers"),
        ({"items": ["algorithms=pf2lora,local"]}, "not both: local with pf2lora"),
        ({"items": ["algorithms=pfedlora"], "variants": ["homlora"]}, "not both: pfedlora with homlora"),
        ({"items": ["algorithms=pf2lora,homlora"], "baseline": "local"}, "--baseline 'local' is not a row"),
        ({"items": ["heterogeneity=0.5,1.5"]}, "heterogeneity must be in [0, 1]"),
        ({"items": ["heterogeneity=0.5,0.9", "data.partition=dirichlet"]}, "need data.partition=heterogeneity"),
        ({"items": [], "metric": "auc"}, "unknown metric 'auc'"),
        ({"items": [], "ablations": ["dropout"]}, "unknown ablation 'dropout'"),
        ({"items": [], "sweeps": ["personal_rank"]}, "is not of the form KEY=V1,V2"),
        ({"items": [], "sweeps": ["personal_rank=1,9"]}, "must be smaller than lora.rank"),
        ({"items": [], "variants": ["rank=3"]}, "must be 'ALGORITHM key=value ...'"),
        ({"items": ["nonsense"]}, "is not of the form key=value"),
        (
            {"items": ["train.rounds=8", "train.eval_every=3"], "at_round": 4},
            "is evaluated after rounds 3, 6, 8 only (train.rounds=8, train.eval_every=3)",
        ),
        ({"items": ["train.rounds=2", "train.eval_every=0"], "at_round": 1}, "after rounds 2 only"),
    ],
)
def test_bad_grids_are_refused_before_any_run(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        compare.plan(None, **kwargs)
    assert message in str(err.value)


def test_model_heterogeneous_methods_and_their_column() -> None:
    items = ["algorithms=pfedlora,local", "data.dataset=digits", "data.partition=classes", "seeds=0,1"]
    grid = compare.plan(None, items, variants=["pfedlora pfedlora.objective=combined"], baseline="local")
    assert [r.label for r in grid.rows] == ["pfedlora", "local", "pfedlora (pfedlora.objective=combined)"]
    assert [c.label for c in grid.columns] == ["2 classes per client"]
    assert grid.baseline == "local" and len(grid.runs) == 3 * 2
    assert {cfg.pfedlora.objective for row, _, _, cfg in grid.runs if row.overrides} == {"combined"}
    dirichlet = compare.plan(None, ["algorithms=local", "data.dataset=digits", "data.partition=dirichlet"])
    assert [c.label for c in dirichlet.columns] == ["Dirichlet alpha=0.5"]


def test_paired_differences_by_hand() -> None:
    p = compare.paired([0.5, 0.7, 0.6], [0.4, 0.7, 0.7])
    assert p["differences"] == pytest.approx([0.1, 0.0, -0.1])
    assert p["mean"] == pytest.approx(0.0) and p["std"] == pytest.approx((0.02 / 3) ** 0.5)
    # t(0.975, 2 degrees of freedom) = 4.302653; sample std of the differences 0.1; 3 seeds
    half = 4.302653 * 0.1 / 3**0.5
    assert p["ci95"] == pytest.approx([-half, half], rel=1e-6)
    assert (p["wins"], p["ties"], p["losses"]) == (1, 1, 1)
    one = compare.paired([0.5], [0.4])  # one seed: a difference, no interval
    assert one["mean"] == pytest.approx(0.1) and one["ci95"] is None
    assert compare._paired_cell(one) == "+10.00 ± 0.00, 1/0/0"


def _fake_results(out: Path, grid: compare.Plan) -> None:
    """results.json of every run: client c scores 0.1 * (c + 1) + 0.01 * seed (+ 0.2 for homlora)."""
    for row, column, seed, _ in grid.runs:
        folder = compare.run_dir(out, row, column, seed)
        folder.mkdir(parents=True)
        bonus = 0.2 if row.algorithm == "homlora" else 0.0
        clients = {
            str(c): {"accuracy": 0.1 * (c + 1) + 0.01 * seed + bonus, "mcc": 0.0, "macro_f1": 0.0} for c in range(2)
        }
        mean = sum(m["accuracy"] for m in clients.values()) / 2
        result = {
            "clients": clients,
            "mean": {"accuracy": mean, "mcc": 0.0, "macro_f1": 0.0},
            "trainable_parameters": 1000,
            "communicated_parameters_per_client_round": None if row.algorithm == "centralized" else 2000,
        }
        (folder / "results.json").write_text(json.dumps({row.algorithm: result}))


def test_table_mean_and_std_over_seeds(tmp_path: Path) -> None:
    grid = compare.plan(None, ["algorithms=pf2lora,homlora,centralized", "heterogeneity=0.6,1.0", "seeds=0,2"])
    _fake_results(tmp_path, grid)
    table = compare.build_table(grid, tmp_path)
    compare.write_table(table, tmp_path)
    rows = {r["method"]: r for r in table["rows"]}
    cell = rows["homlora"]["cells"]["h=0.6"]
    # per seed: mean over clients (0.1 + 0.2) / 2 + 0.01 seed + 0.2 -> 0.35, 0.37
    assert cell["seeds"] == pytest.approx([0.35, 0.37])
    assert cell["mean"] == pytest.approx(0.36) and cell["std"] == pytest.approx(0.01)
    assert cell["clients"] == pytest.approx({"0": 0.31, "1": 0.41})
    assert rows["centralized"]["communicated_parameters_per_client_round"] is None
    md = (tmp_path / "table.md").read_text()
    assert "| homlora | 1.0K | 2.0K | **36.00 ± 1.00** | **36.00 ± 1.00** |" in md
    assert "| centralized | 1.0K | – |" in md
    with open(tmp_path / "table.csv") as f:
        lines = list(csv.reader(f))
    assert lines[0][:3] == ["method", "trainable_parameters", "communicated_parameters_per_client_round"]
    assert len(lines) == 4 and all(len(line) == 3 + 2 * 2 for line in lines)
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "vs_baseline" not in cell and table["baseline"] is None


def test_table_against_a_baseline(tmp_path: Path) -> None:
    grid = compare.plan(None, ["algorithms=pf2lora,homlora,centralized", "seeds=0,2"], baseline="pf2lora")
    _fake_results(tmp_path, grid)
    table = compare.build_table(grid, tmp_path)
    rows = {r["method"]: r for r in table["rows"]}
    assert "vs_baseline" not in rows["pf2lora"]["cells"]["h=0.9"]
    hom = rows["homlora"]["cells"]["h=0.9"]["vs_baseline"]  # 0.2 better on both seeds
    assert hom["differences"] == pytest.approx([0.2, 0.2]) and hom["ci95"] == pytest.approx([0.2, 0.2])
    assert (hom["wins"], hom["ties"], hom["losses"]) == (2, 0, 0)
    cen = rows["centralized"]["cells"]["h=0.9"]["vs_baseline"]
    assert (cen["wins"], cen["ties"], cen["losses"]) == (0, 2, 0)
    md = compare.markdown(table)
    assert "| Against pf2lora | h=0.9 |" in md
    assert "| homlora | +20.00 ± 0.00 [+20.00, +20.00], 2/0/0 |" in md


def test_table_after_an_earlier_round_from_the_learning_curve(tmp_path: Path) -> None:
    # Arrange: finished runs whose metrics.jsonl evaluated after rounds 1 and 2; each run's round 1
    # recorded twice (a resumed run repeats its crashed round): the last record counts
    items = ["algorithms=pf2lora,homlora", "seeds=0,1", "train.rounds=2", "train.eval_every=1"]
    grid = compare.plan(None, items)
    _fake_results(tmp_path, grid)
    for row, column, seed, _ in grid.runs:
        bonus = 0.3 if row.algorithm == "pf2lora" else 0.0

        def evaluation(r: int, value: float) -> str:
            clients = {str(c): {"accuracy": value + 0.1 * c, "mcc": 0.5, "num_examples": 10} for c in range(2)}
            return json.dumps({"round": r, "clients": {}, "eval": clients})

        lines = [evaluation(1, 0.9), evaluation(1, 0.2 + 0.01 * seed + bonus), evaluation(2, 0.8)]
        (compare.run_dir(tmp_path, row, column, seed) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # Act
    early = compare.plan(None, items, baseline="homlora", at_round=1)
    table = compare.build_table(early, tmp_path)
    # Assert: round 1's second record, mean over clients (0.2 and 0.3, + 0.01 seed, + 0.3 for pf2lora)
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["homlora"]["cells"]["h=0.9"]["seeds"] == pytest.approx([0.25, 0.26])
    assert rows["pf2lora"]["cells"]["h=0.9"]["vs_baseline"]["differences"] == pytest.approx([0.3, 0.3])
    assert table["round"] == 1 and "accuracy (x100) after round 1, mean over clients" in compare.markdown(table)
    final = compare.build_table(compare.plan(None, items), tmp_path)  # results.json, as before
    assert {r["method"]: r for r in final["rows"]}["homlora"]["cells"]["h=0.9"]["seeds"] == pytest.approx([0.35, 0.36])


def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "heterogeneity=0.5,7", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf2lora: error: ") and len(err.splitlines()) == 1
    assert main(["compare", *TINY, "data.dataset=nonexistent_set", "--out", str(out)]) == 2
    assert "pf2lora: error: " in capsys.readouterr().err
    for bad in (["--baseline", "fedprox"], ["algorithms=pf2lora,pfedlora"]):  # no such row; two kinds of method
        assert main(["compare", *TINY, *bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pf2lora: error: ") and len(err.splitlines()) == 1
    for bad_round in (["--round", "-1"], ["--round", "99"]):  # no such evaluation
        assert main(["compare", *TINY, *bad_round, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pf2lora: error: --round") and len(err.splitlines()) == 1
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert main(["compare", *TINY, "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "earlier work"


@pytest.mark.integration
def test_compare_on_the_bundled_model_produces_a_complete_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    methods = "pf2lora,hetlora,homlora,perfedavg,centralized"
    args = ["compare", *TINY, f"algorithms={methods}", "heterogeneity=0.5,1.0", "seeds=0", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in table["rows"]] == methods.split(",")
    for r in table["rows"]:
        for column in ("h=0.5", "h=1"):
            cell = r["cells"][column]
            assert 0.0 <= cell["mean"] <= 1.0 and len(cell["seeds"]) == 1 and len(cell["clients"]) == 2
        assert r["trainable_parameters"] > 0
        assert (r["communicated_parameters_per_client_round"] is None) == (r["method"] == "centralized")
        assert f"| {r['method']} |" in printed
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.csv", "table.json", "compare.png", "runs"}
    # --resume keeps the finished runs: nothing is trained again
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert len(stamp) == 5 * 2
    assert main([*args, "--quiet", "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamp


def test_compare_runs_pfedlora_and_its_baselines_as_pf2lora_run_does(tmp_path: Path, capsys, monkeypatch) -> None:
    """Each run of the grid is the run `pf2lora run` makes with the same settings and seed."""
    tiny = [
        "data.dataset=digits",
        "data.num_clients=2",
        "data.partition=classes",
        "pfedlora.models=[cnn5]",
        "train.rounds=1",
        "train.local_steps=2",
    ]
    out = tmp_path / "cmp"
    args = ["compare", *tiny, "algorithms=pfedlora,local", "seeds=0,1", "--baseline", "local", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| Against local | 2 classes per client |" in printed and "| pfedlora | " in printed
    table = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["pfedlora", "local"]
    assert main(["run", *tiny, "algorithms=[pfedlora]", "seed=1", "--quiet", "--out", str(tmp_path / "one")]) == 0
    alone = json.loads((tmp_path / "one" / "results.json").read_text())["pfedlora"]["mean"]["accuracy"]
    pfedlora = table["rows"][0]["cells"]["2 classes per client"]
    assert pfedlora["seeds"][1] == alone
    local = table["rows"][1]["cells"]["2 classes per client"]["seeds"]
    assert pfedlora["vs_baseline"]["differences"] == pytest.approx([a - b for a, b in zip(pfedlora["seeds"], local)])
    # --resume of a finished grid neither trains nor prepares anything again
    import pf2lora.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was prepared again")

    monkeypatch.setitem(pf2lora.runner._PREPARE, "heterogeneous", refuse)
    assert main([*args, "--quiet", "--resume"]) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


def test_compare_jobs_runs_the_grid_in_worker_processes_with_the_same_results(tmp_path: Path, capsys) -> None:
    """--jobs 2 runs two runs at once, each in its own process; every run is seeded by its config,
    so the table is the one --jobs 1 writes (same threads per run)."""
    tiny = ["data.dataset=digits", "data.num_clients=2", "data.partition=classes", "pfedlora.models=[cnn5]"]
    tiny += ["train.rounds=1", "train.local_steps=2", "train.threads=1", "algorithms=pfedlora,local", "seeds=0,1"]
    tables = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["compare", *tiny, "--jobs", jobs, "--quiet", "--out", str(out)]) == 0
        tables.append(json.loads((out / "table.json").read_text())["rows"])
        assert len(list(out.rglob("results.json"))) == 4
    assert tables[0] == tables[1]
    capsys.readouterr()
    assert main(["compare", *tiny, "--jobs", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_resume_keeps_a_run_whose_config_was_written_before_a_field_existed(tmp_path: Path) -> None:
    # Prepare: a finished run whose config.yaml lacks the `task` section (written before tasks existed)
    import yaml

    grid = compare.plan(None, ["algorithms=homlora", *TINY])
    row, column, seed, cfg = grid.runs[0]
    folder = compare.run_dir(tmp_path, row, column, seed)
    folder.mkdir(parents=True)
    old = cfg.to_dict()
    del old["task"]
    (folder / "config.yaml").write_text(yaml.safe_dump(old))
    (folder / "results.json").write_text("{}")
    # Execute / Assert: it counts as finished; a changed value does not
    assert compare._finished(folder, cfg)
    old["train"]["lr"] = 1.0
    (folder / "config.yaml").write_text(yaml.safe_dump(old))
    assert not compare._finished(folder, cfg)
