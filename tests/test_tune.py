"""pf2lora tune: search specifications, bad input (one line, exit 2, nothing written), a study that
finds the learning rate that learns, never touches the test split, and resumes without repeating
a finished trial."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml

from pf2lora import tune
from pf2lora.cli import main
from pf2lora.config import ConfigError


def test_search_specifications() -> None:
    assert tune.parse_space("train.lr=log:1e-4:1e-2") == tune.Space("train.lr", "log", 1e-4, 1e-2)
    assert tune.parse_space("train.lower_lr=0.01:1") == tune.Space("train.lower_lr", "float", 0.01, 1.0)
    assert tune.parse_space("lora.personal_rank=int:1:4") == tune.Space("lora.personal_rank", "int", 1, 4)
    assert tune.parse_space("pf2lora/train.lr=1e-3,5e-3") == tune.Space(
        "train.lr", "choice", choices=(1e-3, 5e-3), method="pf2lora"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("train.lr=log:1e-2:1e-3", "the range is empty"),
        ("train.lr=3:3", "the range is empty"),
        ("train.lr=log:0:1", "a log range needs LOW > 0"),
        ("train.lr=,", "no values to choose from"),
        ("train.lr", "is not of the form KEY=SPEC"),
        ("lora.personal_rank=int:1.5:4", "whole numbers"),
        ("train.lr=a:b", "must be numbers"),
        ("train.lr=1e-3,1e-3", "given twice"),
    ],
)
def test_bad_search_specifications(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        tune.parse_space(spec)


def easy_csv(path: Path, n: int = 240) -> Path:
    """Sentiment a model learns in a few steps: the label is the adjective's polarity."""
    rng = random.Random(0)
    good = ["wonderful", "excellent", "great", "delightful", "superb", "lovely"]
    bad = ["terrible", "awful", "horrible", "dreadful", "bad", "boring"]
    things = ["the film", "this movie", "the show", "our trip", "the meal", "that book", "the service", "the hotel"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            positive = i % 2 == 1
            word = rng.choice(good if positive else bad)
            writer.writerow([f"{rng.choice(things)} was {word}", "positive" if positive else "negative"])
    return path


def easy(tmp_path: Path) -> list[str]:
    return [
        "data.dataset=file",
        f"data.path={easy_csv(tmp_path / 'easy.csv')}",
        "data.num_clients=2",
        "data.partition=iid",
        "train.rounds=2",
        "train.local_steps=8",
        "train.batch_size=8",
        "model.max_length=16",
        "train.workers=1",
    ]


@pytest.mark.parametrize(
    ("items", "flags", "message"),
    [
        ([], ["--search", "train.nope=1e-3,1e-2"], "unknown config key 'train.nope'"),
        ([], ["--search", "train.lr=log:1e-2:1e-4"], "the range is empty"),
        ([], ["--search", "data.max_examples=10,20"], "tune searches a method's own settings"),
        ([], ["--search", "pf2lora/train.lower_lr=0.1,1"], "pf2lora is not tuned here"),
        ([], ["--search", "train.lr=0:1"], "train.lr must be > 0"),
        ([], ["--metric", "bleu"], "unknown metric 'bleu'"),
        ([], ["--trials", "0"], "--trials must be >= 1"),
        ([], ["--methods", "nope"], "unknown method 'nope'"),
        (["data.validation_fraction=1.5"], [], "data.validation_fraction must be in [0, 1)"),
        (["data.max_examples=8", "data.num_clients=4", "data.validation_fraction=0.9"], [], "leaves client 0 without"),
        (["report_to=[neptune]"], [], "unknown report_to 'neptune'"),
    ],
)
def test_bad_tune_input_exits_2_with_one_line_before_any_work(items, flags, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    methods = [] if "--methods" in flags else ["--methods", "homlora"]
    code = main(["tune", *items, *methods, *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_resume_needs_a_study(tmp_path: Path, capsys) -> None:
    assert main(["tune", "--methods", "homlora", "--resume", "--out", str(tmp_path)]) == 2
    assert "holds no study" in capsys.readouterr().err


class Poisoned:
    """A test split that fails on any look at a client's examples."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, cid: int):
        raise AssertionError(f"the test split of client {cid} was read")

    def __iter__(self):
        raise AssertionError("the test split was read")


@pytest.mark.integration
def test_tune_finds_the_learning_rate_never_reads_the_test_split_and_resumes(tmp_path: Path, monkeypatch) -> None:
    import optuna

    from pf2lora.tasks import classification

    built = classification.build_federated_data

    def poisoned(*args, **kwargs):
        data = built(*args, **kwargs)
        data.test = Poisoned(len(data.test))
        return data

    monkeypatch.setattr(classification, "build_federated_data", poisoned)
    out = tmp_path / "study"
    # a learning rate that learns the polarity in 16 steps, and one that diverges
    study = tune.plan(None, easy(tmp_path), ["homlora"], ["train.lr=1e-2,30.0"])
    assert study.sampler == "grid" and study.trials == 2
    summary = tune.execute(study, out)
    trials = summary["methods"]["homlora"]["trials"]
    values = {t["params"]["train.lr"]: t["value"] for t in trials}
    assert values[1e-2] > 0.9 > values[30.0]  # the one that diverges loses
    assert summary["methods"]["homlora"]["best"]["params"] == {"train.lr": 1e-2}
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best == {"per_method": {"homlora": {"train": {"lr": 1e-2}}}}
    assert (out / "homlora_history.png").is_file() and (out / "trials.json").is_file()
    for trial in trials:  # every number each trial wrote is a validation one
        results = json.loads((out / trial["run_dir"] / "results.json").read_text())["homlora"]
        assert results["metric_names"][0] == "val_accuracy"
        assert all(k.startswith("val_") for k in results["mean"])
        config = yaml.safe_load((out / trial["run_dir"] / "config.yaml").read_text())
        assert config["data"]["evaluate_test"] is False and config["data"]["validation_fraction"] == 0.2

    # a process killed during a third trial left it running; --resume fails it and runs its values
    # again, and keeps the finished trials as they are
    written = {t["number"]: (out / t["run_dir"] / "results.json").stat().st_mtime_ns for t in trials}
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    killed = optuna.load_study(study_name="homlora", storage=storage).ask(
        {"train.lr": optuna.distributions.CategoricalDistribution([1e-2, 30.0])}
    )
    other = tune.plan(None, easy(tmp_path), ["homlora"], ["train.lr=1e-2,3e-2"], trials=3)
    with pytest.raises(ConfigError, match="the study was started with search"):
        tune.check_folder(out, True, False, other)
    study = tune.plan(None, easy(tmp_path), ["homlora"], ["train.lr=1e-2,30.0"], trials=3)
    tune.check_folder(out, True, False, study)  # the same plan, more trials: fine
    summary = tune.execute(study, out, resume=True)
    states = {t["number"]: t for t in summary["methods"]["homlora"]["trials"]}
    assert states[killed.number]["state"] == "FAIL"
    retried = [t for n, t in states.items() if n > killed.number]
    assert len(retried) == 1 and retried[0]["state"] in ("COMPLETE", "PRUNED")  # finished, either way
    assert retried[0]["params"] == killed.params
    for number, mtime in written.items():  # not run again
        assert states[number]["state"] == "COMPLETE"
        assert (out / states[number]["run_dir"] / "results.json").stat().st_mtime_ns == mtime


class AlwaysPrune:
    def __init__(self) -> None:
        self.reported: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def should_prune(self) -> bool:
        return True


def test_the_pruner_sees_each_rounds_mean_validation_metric_and_spares_a_finished_trial() -> None:
    import optuna

    trial = AlwaysPrune()
    pruning = tune.Pruning(trial, "val_accuracy", rounds=4)
    record = {"round": 2, "eval": {"0": {"val_accuracy": 0.5, "accuracy": 0.0}, "1": {"val_accuracy": 1.0}}}
    with pytest.raises(optuna.TrialPruned):
        pruning.on_round("homlora", record)
    assert trial.reported == [(0.75, 2)]
    pruning.on_round("homlora", {"round": 3})  # no evaluation this round: nothing reported
    pruning.on_round("homlora", {**record, "round": 4})  # the last round: complete, never pruned
    assert trial.reported[-1] == (0.75, 4)
    with pytest.raises(optuna.TrialPruned, match="nan"):
        pruning.on_round("homlora", {"round": 4, "eval": {"0": {"val_accuracy": float("nan")}}})
