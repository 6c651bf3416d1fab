"""A run killed (SIGKILL) at any moment and resumed ends exactly as an uninterrupted run; bad --resume input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN
from safetensors.torch import load_file

from pf2lora.cli import main
from pf2lora.report import Progress

# kills its own process at one moment of a run, then runs the CLI: argv = moment, then the CLI's
KILLER = """
import os, signal, sys
from pf2lora import rounds
from pf2lora.engines import local

moment = sys.argv[1]
train, evaluate, save = local.Site.train, local.Site.evaluate, rounds.Checkpoint.save

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_train(self, cid, instruction, data):  # mid-round: HETLoRA (2nd method) round 2, client 0 trained
    result = train(self, cid, instruction, data)
    if moment == "mid-round" and type(self.client).__name__ == "HetLoRAClient":
        if instruction.config["server_round"] == 2 and cid == 0:
            kill()
    return result

def killing_save(self, server_round, *args):  # between rounds: PF2LoRA's round-2 checkpoint written
    save(self, server_round, *args)
    if moment == "between-rounds" and self.folder.name == "pf2lora" and server_round == 2:
        kill()

def killing_evaluate(self, cid, instruction, *args):  # during PF2LoRA's final evaluation, client 1
    if moment == "evaluation" and type(self.client).__name__ == "PF2LoRAClient":
        if instruction.config["server_round"] == 3 and cid == 1:
            kill()
    return evaluate(self, cid, instruction, *args)

local.Site.train, local.Site.evaluate, rounds.Checkpoint.save = killing_train, killing_evaluate, killing_save
if moment == "flower-mid-round":  # the server, once HETLoRA's round-2 replies came (the clients trained)
    from pf2lora.engines.flower import server

    exchange = server.FlowerEngine._exchange

    def killing_exchange(self, kind, server_round, *args, **kwargs):
        result = exchange(self, kind, server_round, *args, **kwargs)
        if kind == "train" and server_round == 2 and self.name == "hetlora":
            kill()
        return result

    server.FlowerEngine._exchange = killing_exchange
from pf2lora.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _config(tiny_model_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name={tiny_model_dir}",
        "data.num_clients=3",
        "data.max_examples=60",
        "data.max_test_examples=24",
        "model.max_length=24",
        "train.rounds=3",
        "train.eval_every=1",
        "algorithms=[pf2lora,hetlora]",
        *TINY_TRAIN,
        *extra,
    ]


def _killed(moment: str, *argv: str) -> None:
    """Run ``pf2lora argv`` in its own process, killed (SIGKILL) at ``moment``."""
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLER, moment, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        start_new_session=True,  # its own process group, which Ray's helpers join
    )
    _, stderr = killed.communicate()
    with contextlib.suppress(ProcessLookupError):  # what the killed process left running (Flower's Ray)
        os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -9, stderr[-2000:]


def _without_bytes(value):
    if isinstance(value, dict):
        return {k: _without_bytes(v) for k, v in value.items() if "bytes" not in k}
    return value


def _same_run(ours: Path, reference: Path, message_bytes: bool = True) -> None:
    """Same results (but for seconds), same metrics.jsonl, same checkpoints and adapters, nothing left
    to resume. ``message_bytes``: compare the bytes of Flower's messages too (their metadata, such as
    the run's id, is not the same from one run to the next)."""
    a, b = (json.loads((d / "results.json").read_text()) for d in (ours, reference))
    for method in ("pf2lora", "hetlora"):
        a[method].pop("seconds"), b[method].pop("seconds")
    assert a == b
    if message_bytes:
        assert (ours / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    else:
        lines = [
            [_without_bytes(json.loads(line)) for line in d.read_text().splitlines()]
            for d in (ours / "metrics.jsonl", reference / "metrics.jsonl")
        ]
        assert lines[0] == lines[1]
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(ours) for p in ours.rglob("*.safetensors"))
    for name in files:
        theirs, mine = load_file(str(reference / name)), load_file(str(ours / name))
        assert theirs.keys() == mine.keys()
        assert all(theirs[k].equal(mine[k]) for k in theirs), name
    assert not (ours / "resume").exists()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, client states in memory and on disk."""
    runs = {}
    for where in ("memory", "disk"):
        out = tmp_path_factory.mktemp("reference") / where
        assert main(["run", *_config(tiny_model_dir, f"train.client_state={where}"), "--out", str(out), "--quiet"]) == 0
        runs[where] = out
    return runs


@pytest.mark.integration
@pytest.mark.parametrize(
    ("moment", "where"),
    [("mid-round", "memory"), ("mid-round", "disk"), ("between-rounds", "memory"), ("evaluation", "memory")],
)
def test_a_killed_run_resumes_to_the_same_end(
    moment, where, reference, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # Arrange: the run killed with SIGKILL at the moment; the progress bars of the resumed run counted
    out = tmp_path / "run"
    config = _config(tiny_model_dir, f"train.client_state={where}")
    _killed(moment, "run", *config, "--out", str(out), "--quiet")
    assert not (out / "results.json").exists() and (out / "resume").is_dir()
    bars: dict[str, list[int]] = {}  # method -> [advanced, total]

    def task(self, name: str, total: int):
        bars[name] = [0, total]
        return lambda: bars[name].__setitem__(0, bars[name][0] + 1)

    monkeypatch.setattr(Progress, "task", task)
    # Act: resumed from the folder alone
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    # Assert: the same end, and the resumed method's bar ends full (it starts where the crash left it)
    _same_run(out, reference[where])
    assert bars and all(done == total for done, total in bars.values()), bars


@pytest.mark.integration
def test_a_killed_flower_server_resumes_and_its_clients_go_back_to_the_last_complete_round(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Arrange: an uninterrupted Flower simulation, and one whose server is killed in HETLoRA's round 2
    # after every client trained it (their round-2 states are on their disks)
    config = [*_config(tiny_model_dir), "engine=flower"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(["run", *config, "--out", str(reference), "--quiet"]) == 0
    _killed("flower-mid-round", "run", *config, "--out", str(out), "--quiet")
    assert any((out / "client_state" / "hetlora").glob("client0.r2.pt"))
    # Act
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    # Assert
    _same_run(out, reference, message_bytes=False)


@pytest.mark.integration
def test_compare_resume_continues_a_half_done_run(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    # Arrange: a comparison killed after its only run's round 2
    out = tmp_path / "compare"
    items = ["compare", *_config(tiny_model_dir), "algorithms=pf2lora", "seeds=0", "--out", str(out), "--quiet"]
    _killed("between-rounds", *items)
    (run,) = [p.parent for p in out.rglob("config.yaml")]
    before = (run / "metrics.jsonl").read_text()
    assert [json.loads(line)["round"] for line in before.splitlines()] == [1, 2]
    # Act
    assert main([*items[:-1], "--resume"]) == 0
    # Assert: rounds 1 and 2 kept as they were (not run again), round 3 added, the table written
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(before) and [json.loads(line)["round"] for line in after.splitlines()] == [1, 2, 3]
    assert (out / "table.md").is_file() and (run / "results.json").is_file() and not (run / "resume").exists()


def test_resume_bad_input_exits_2_and_leaves_the_run_as_it_was(tmp_path: Path, capsys) -> None:
    # a folder that is not a run
    (tmp_path / "empty").mkdir()
    assert main(["run", "--resume", str(tmp_path / "empty")]) == 2
    assert "is not a pf2lora run directory" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # a run whose config differs from the one given
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  rounds: 3\n")
    (run / "metrics.jsonl").write_text('{"algorithm": "pf2lora", "round": 1}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["run", "--resume", str(run), "train.rounds=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"pf2lora: error: --resume {run}: the run was started with train.rounds=3, not 4 (1 setting differs); "
        "resume it with its own config"
    )
    assert main(["run", "configs/default.yaml", "--resume", str(run)]) == 2
    assert "the run was started with" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--out", str(tmp_path / "other")]) == 2
    assert "name different directories" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written
