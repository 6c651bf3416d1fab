"""The real CLI: bad input exits 2 with one line before any work; a small real run on bundled data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pf2lora.cli import main

TINY = [
    "data.num_clients=2",
    "data.max_examples=48",
    "data.max_test_examples=16",
    "train.rounds=1",
    "train.local_steps=2",
    "train.batch_size=4",
    "model.max_length=24",
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm=fedprox"], "unknown method 'fedprox'"),
        (["lora.target_modules=[query,qkv_proj]"], "unknown target module(s) qkv_proj"),
        (["lora.rank=0"], "lora.rank must be > 0"),
        (["lora.personal_rank=8"], "must be smaller than lora.rank"),
        (["data.heterogeneity=2"], "heterogeneity must be in [0, 1]"),
        (["data.num_clients=100", "data.max_examples=50"], "num_clients (100) is larger than the number of training"),
        (["data.dataset=file", "data.path=/nonexistent/x.csv"], "does not exist"),
        (["model.name=/nonexistent/model"], "cannot load model"),
        (["algorithm=hetlora", "hetlora.r_min=13"], "hetlora.r_min (13) must not exceed hetlora.r_max (12)"),
        (["algorithm=hetlora", "hetlora.ranks=[8,9,10]"], "hetlora.ranks has 3 entries for 2 clients"),
        (["algorithm=hetlora", "hetlora.gamma=1.2"], "hetlora.gamma must be in (0, 1]"),
        (["algorithm=flexlora", "flexlora.r_min=13"], "flexlora.r_min (13) must not exceed flexlora.r_max (12)"),
        (["algorithm=flexlora", "flexlora.ranks=[4,5,6]"], "flexlora.ranks has 3 entries for 2 clients"),
        (["algorithm=flexlora", "flexlora.ranks=[4,20]"], "flexlora.ranks [20] outside [r_min, r_max] = [4, 12]"),
        (["algorithm=feddpa", "feddpa.local_weight=1.5"], "feddpa.local_weight must be in [0, 1], got 1.5"),
        (["algorithm=feddpa", "feddpa.max_weight=-0.1"], "feddpa.max_weight must be in [0, 1], got -0.1"),
        (["algorithm=feddpa", "feddpa.weighting=max"], "feddpa.weighting must be instance or fixed"),
        (["algorithm=feddpa", "feddpa.instances=0"], "feddpa.instances must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(overrides, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, *overrides, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf2lora: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_missing_column_and_unreadable_file(tmp_path: Path, capsys) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\nhello,1\nworld,0\n")
    assert main(["run", "data.dataset=file", f"data.path={csv}", "--out", str(tmp_path / "o")]) == 2
    assert "no text column 'text'" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "data.dataset=file",
                f"data.path={csv}",
                "data.text_column=sentence",
                "data.label_column=stars",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no label column 'stars'" in capsys.readouterr().err
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"\x00\x01garbage")
    assert main(["run", "data.dataset=file", f"data.path={garbage}", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read data file" in capsys.readouterr().err


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"kept": true}')
    assert main(["run", *TINY, "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"kept": true}'


def test_an_out_directory_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    assert main(["run", *TINY, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pf2lora: error: --out {blocker / 'run'} cannot be made: {blocker} is a file"
    assert blocker.read_text() == "kept"


def test_exit_status_from_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pf2lora.cli", "run", "lora.rank=-1"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pf2lora: error: lora.rank must be > 0, got -1"


@pytest.mark.integration
def test_small_real_run_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    algorithms = "algorithms=[pf2lora,homlora,hetlora]"
    assert (
        main(["run", "configs/default.yaml", *TINY, algorithms, "train.eval_every=1", "--out", str(out), "--quiet"])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["pf2lora", "homlora", "hetlora"]
    for method in results.values():
        assert set(method["clients"]) == {"0", "1"}
        assert set(method["mean"]) >= {"accuracy", "mcc", "macro_f1"}
        accs = [c["accuracy"] for c in method["clients"].values()]
        assert method["mean"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert len(results["pf2lora"]["effective_rank"]["0"]) == 12  # 6 layers x (query, value)
    assert (
        results["pf2lora"]["communicated_parameters_per_client_round"]
        == results["homlora"]["communicated_parameters_per_client_round"]
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["algorithm"], r["round"]) for r in lines] == [("pf2lora", 1), ("homlora", 1), ("hetlora", 1)]
    assert [lines[2]["clients"][c]["rank"] for c in ("0", "1")] == [8, 10]  # HETLoRA's ranks, r_min..r_max
    assert set(lines[0]["clients"]["0"]) >= {"train_loss", "bytes_sent", "bytes_received"}
    assert "effective_rank" in lines[0] and "eval" in lines[0]
    for name in (
        "config.yaml",
        "accuracy_per_client.png",
        "curves.png",
        "checkpoints/pf2lora/common.safetensors",
        "checkpoints/pf2lora/personal_client1.safetensors",
        "adapters/pf2lora/client1/adapter_config.json",
        "adapters/homlora/client0/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    # each exported adapter has a real model card (its client's metrics) and the label names
    card = (out / "adapters" / "pf2lora" / "client1" / "README.md").read_text()
    assert "More Information Needed" not in card
    acc = results["pf2lora"]["clients"]["1"]["accuracy"]
    assert "**Client:** 1 of 2" in card and f"accuracy {acc:.4f}" in card and "bbc_news" in card
    labels = json.loads((out / "adapters" / "pf2lora" / "client1" / "config.json").read_text())["id2label"]
    assert list(labels.values()) == ["business", "entertainment", "politics", "sports", "tech"]
