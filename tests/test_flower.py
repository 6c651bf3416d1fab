"""The Flower engine: the codec, the node's state store, bad input, and (integration) parity with
the local engine, a client that fails mid-run, and a real deployment on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TRAIN
from flwr.app import RecordDict
from safetensors.torch import load_file

from pf2lora.cli import main
from pf2lora.compression import transmit
from pf2lora.config import ConfigError, load_config
from pf2lora.engines.flower.client_app import node_states
from pf2lora.engines.flower.records import (
    decode_params,
    encode_params,
    message_bytes,
    param_names,
)
from pf2lora.methods import check

REPO = Path(__file__).resolve().parent.parent
LORA_METHODS = [
    "pf2lora",
    "hetlora",
    "homlora",
    "perfedavg",
    "fedsa_lora",
    "ffa_lora",
    "flexlora",
    "feddpa",
    "fedex_lora",
]


def _params(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {
        "layer.0.query.lora_A.common.weight": torch.randn(rank, 16, generator=g),
        "layer.0.query.lora_B.common.weight": torch.randn(16, rank, generator=g),
        "classifier.weight": torch.randn(3, 16, generator=g),
        "step": torch.tensor([7]),
    }


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16"])
def test_payload_round_trip_is_name_keyed_and_matches_the_local_engine(compression: str) -> None:
    # Prepare: two clients of different HETLoRA ranks
    for rank in (4, 7):
        params = _params(rank)
        # Execute
        received = decode_params(encode_params(params, compression))
        # Assert: the same names and shapes; values exactly as the local engine's simulated wire gives them
        expected, _ = transmit(params, compression)
        assert list(received) == sorted(params)  # in name order (what Flower's clipping mod compares)
        for name in params:
            assert received[name].dtype == params[name].dtype
            torch.testing.assert_close(received[name], expected[name], rtol=0, atol=0)


def test_payload_decodes_by_name_whatever_the_order() -> None:
    record = encode_params(_params(4))
    shuffled = {name: record[name] for name in reversed(list(record))}
    from flwr.app import ArrayRecord

    again = ArrayRecord()
    for name, array in shuffled.items():
        again[name] = array
    torch.testing.assert_close(decode_params(again), decode_params(record))


@pytest.mark.parametrize("compression", ["none", "bf16"])
def test_payload_travels_as_one_array_per_dtype_naming_every_tensor(compression: str) -> None:
    # Flower ships each array as an object of its own (one request per hop): 4 tensors, 2 arrays
    from flwr.app import ArrayRecord

    params = _params(4)
    record = encode_params(params, compression)
    assert len(record) == 2  # the floating tensors in one array, the integer step in another
    assert sorted(param_names(record)) == sorted(params)
    assert param_names(ArrayRecord({"plain": record[next(iter(record))]})) == ["plain"]  # an array of its own
    with pytest.raises(ValueError, match="not a pf2lora payload"):
        decode_params(ArrayRecord({"plain": record[next(iter(record))]}))
    key = next(k for k in record if "step" in k)
    broken = ArrayRecord({key.replace("[1]", "[2]"): record[key]})  # a layout that does not fit its array
    with pytest.raises(ValueError, match="holds 1 values, its layout 2"):
        decode_params(broken)


def test_supernode_waits_are_capped_in_flowers_module_only(monkeypatch) -> None:
    import time
    import types

    from pf2lora.engines.flower.supernode import CappedClock, cap_waits

    module = types.ModuleType("fake_flower_module")
    module.time = time  # type: ignore[attr-defined]
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    cap_waits(module, 0.2)
    module.time.sleep(3)  # type: ignore[attr-defined]
    module.time.sleep(0.1)  # type: ignore[attr-defined]
    assert slept == [0.2, 0.1]
    assert isinstance(module.time, CappedClock) and module.time.monotonic is time.monotonic  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="no longer uses `time`"):
        cap_waits(types.ModuleType("changed"), 0.2)


@pytest.mark.parametrize("interval", ["0", "-1", "3.5", "nan"])
def test_supernode_refuses_a_bad_pull_interval(interval: str, capsys) -> None:
    assert main(["supernode", "--pull-interval", interval, "--insecure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf2lora: error: --pull-interval") and len(err.splitlines()) == 1


def test_bytes_grow_with_the_payload_and_shrink_with_compression() -> None:
    small = message_bytes(RecordDict({"arrays": encode_params(_params(2))}))
    large = message_bytes(RecordDict({"arrays": encode_params(_params(8))}))
    half = message_bytes(RecordDict({"arrays": encode_params(_params(8), "fp16")}))
    floats = sum(v.numel() for k, v in _params(8).items() if v.is_floating_point())
    assert small < large
    assert large - half >= 2 * floats * 0.95  # 2 bytes saved per float


def test_a_node_keeps_its_state_by_round_and_trains_a_repeated_round_from_before_it(tmp_path: Path) -> None:
    # Arrange: client 2 trained in rounds 1 and 2 (the server then crashed before its round-2 checkpoint)
    folder = tmp_path / "client_state" / "pf2lora"
    for server_round in (1, 2):
        node_states(folder, 2, server_round, training=True)[2] = {
            "personal": {"a": torch.full((3,), float(server_round))}
        }
    assert sorted(p.name for p in folder.iterdir()) == ["client2.r1.pt", "client2.r2.pt"]
    # Act: the resumed server sends round 2 again
    again = node_states(folder, 2, 2, training=True)
    # Assert: the state before round 2, not the crashed round's
    torch.testing.assert_close(again[2]["personal"]["a"], torch.full((3,), 1.0))
    assert sorted(p.name for p in folder.iterdir()) == ["client2.r1.pt"]
    # an evaluation reads the latest; two versions at most are kept
    for server_round in (2, 3):
        node_states(folder, 2, server_round, training=True)[2] = {
            "personal": {"a": torch.full((3,), float(server_round))}
        }
    assert sorted(p.name for p in folder.iterdir()) == ["client2.r2.pt", "client2.r3.pt"]
    torch.testing.assert_close(node_states(folder, 2, 3, training=False)[2]["personal"]["a"], torch.full((3,), 3.0))
    assert 2 not in node_states(tmp_path / "client_state" / "hetlora", 2, 3, training=False)  # each method its own


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine=ray"], "unknown engine 'ray'"),
        (["engine=flower", "algorithms=[centralized]"], "runs on engine=local only"),
        (["engine=flower", "flower.fail=[two@1]"], "flower.fail: 'two@1' is not CLIENT@ROUND"),
        (["engine=flower", "flower.min_replies=0"], "flower.min_replies must be >= 1"),
        (["engine=flower", "flower.timeout=0"], "flower.timeout must be > 0"),
        (["flower.secure_aggregation=true"], "flower.secure_aggregation runs on a Flower federation"),
        (["engine=flower", "flower.secure_aggregation=true", "algorithms=[hetlora]"], "hetlora does not average"),
        (["engine=flower", "flower.secure_aggregation=true", "dp.enabled=true"], "the server cannot clip an update"),
        (["engine=flower", "flower.secure_aggregation=true", "train.aggregation=weighted"], "needs train.aggregation"),
        (["engine=flower", "flower.secure_aggregation=true", "train.update_norm_bound=1"], "cannot hold one to"),
        (["engine=flower", "flower.secure_aggregation=true", "data.num_clients=1"], "at least 2 clients per round"),
    ],
)
def test_bad_flower_settings_exit_2_before_any_work(overrides, message, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check(load_config(None, overrides))
    out = tmp_path / "run"
    assert main(["run", *overrides, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_loopback_script_refuses_bad_input_before_starting_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("kept")
    for args in (
        ["lora.rank=0", "--out", str(tmp_path / "x")],
        ["--out", str(out)],
        ["--out", str(tmp_path / "x"), "--pull-interval", "0"],
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "flower_loopback.py"), *args, "--work", str(tmp_path / "w")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("flower_loopback: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()
    assert (out / "results.json").read_text() == "kept"


def test_site_prepares_the_announced_experiment_once_and_every_fork_inherits_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # Arrange: a site's executor, a ClientApp's announcement of the experiment, and a stand-in for
    # Flower's run_clientapp that reports what the forked task found in its process
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    from pf2lora import parallelism
    from pf2lora.engines.flower import client_app, site

    threads = torch.get_num_threads()
    monkeypatch.setattr(parallelism, "_FORKS", False)
    # train.threads=2: the forks' setting; the site itself must prepare at one thread all the same
    overrides = ["algorithms=[pf2lora,homlora]", "engine=flower", "train.threads=2"]
    cfg = load_config(None, _tiny(tiny_model_dir) + overrides)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    handoff, seen = tmp_path / "experiment.yaml", tmp_path / "seen"
    monkeypatch.setenv(client_app.HANDOFF_ENV, str(handoff))
    monkeypatch.setattr(client_app, "_EXPERIMENTS", {})
    client_app._announce(text, 0)
    built = []
    monkeypatch.setattr(
        client_app.Experiment,
        "_build",
        lambda self, name: built.append((name, torch.get_num_threads())) or (name, None),
    )

    def task(**kwargs) -> None:
        exp = next(iter(client_app._EXPERIMENTS.values()))
        seen.with_suffix(f".{kwargs['token']}").write_text(f"{sorted(exp.clients)} {torch.get_num_threads()}")
        raise SystemExit(0)  # as Flower's flwr_exit ends a ClientApp

    monkeypatch.setattr(site, "run_clientapp", task)
    executor = site.ForkExecutor(handoff)

    def spec(token: str, kind: TaskType = TaskType.CLIENT_APP) -> ExecutionSpec:
        return ExecutionSpec(kind, "127.0.0.1:9", token, True, None, False, None, True, 1)

    # Act: two tasks forked, each after the loop's reconcile
    executor.reconcile()
    results = [executor.launch(spec("a")), executor.launch(spec("b"))]
    refused = executor.launch(spec("c", TaskType.SERVER_APP))
    while executor.children:
        executor.reconcile()
    # Assert: prepared once in this process (each method built once), inherited by both forks
    assert built == [("pf2lora", 1), ("homlora", 1)] and executor.loaded == text  # at one thread
    data = next(iter(client_app._EXPERIMENTS.values())).prepared.data
    assert set(data.train._done) == set(data.test._done) == {0}  # its own partition's data, no other's
    assert [r.status for r in results] == ["accepted", "accepted"] and refused.status == "failed"
    for token in "ab":
        assert seen.with_suffix(f".{token}").read_text() == f"['homlora', 'pf2lora'] {executor.threads}"
    torch.set_num_threads(threads)


def test_site_refuses_bad_input(capsys) -> None:
    assert main(["site", "--runtime-api-address", "nohost", "--insecure"]) == 2
    assert main(["site", "--runtime-api-address", "h:1", "--root-certificates", "/no/such.pem"]) == 2
    assert main(["site", "--runtime-api-address", "h:1", "--runtime-api-address", "h:99999", "--insecure"]) == 2
    assert main(["site", "--runtime-api-address", "h:1", "--runtime-api-address", "h:1", "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("pf2lora: error: ") for line in err)
    assert "'h:99999'" in err[2] and "given twice" in err[3]


def test_one_site_process_serves_several_supernodes_each_in_its_own_task_loop(tmp_path: Path, monkeypatch) -> None:
    # Arrange: a stand-in for one SuperNode's task loop that records where it ran; the second fails
    import os
    import signal

    from pf2lora.engines.flower import site

    def loop(address: str, insecure: bool, root_certificates: str | None) -> None:
        (tmp_path / address.replace(":", "_")).write_text(f"{os.getpid()} {insecure} {root_certificates}")
        if address.endswith(":2"):
            raise RuntimeError("this SuperNode's loop fails")

    monkeypatch.setattr(site, "serve", loop)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Act
    status = site.serve_many(["h:1", "h:2", "h:3"], True, None)
    # Assert: each address served once, each in its own fork of this process; the failure is the
    # status and did not stop the others; this process's signal handlers are its own again
    seen = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(seen) == ["h_1", "h_2", "h_3"]
    pids = {int(pid) for pid, _, _ in seen.values()}
    assert len(pids) == 3 and os.getpid() not in pids
    assert all(rest == ["True", "None"] for _, *rest in seen.values())
    assert status == 1
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ----------------------------------------------------------------------------- integration


def _tiny(model: Path) -> list[str]:
    return [
        f"model.name={model}",
        "model.max_length=24",
        "data.dataset=bbc_news",
        "data.num_clients=3",
        "data.max_examples=90",
        "data.max_test_examples=30",
        *TINY_TRAIN,
    ]


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    for client in a:
        for key in ("accuracy", "mcc", "macro_f1", "loss", *(k for k in a[client] if k.startswith("val_"))):
            assert abs(a[client][key] - b[client][key]) <= tol, (client, key)


@pytest.mark.integration
def test_flower_simulation_matches_the_local_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: one config, every LoRA method, run on both engines
    # (each client also evaluated on a validation split held out of its training data: val_ metrics alike)
    common = [
        *_tiny(tiny_model_dir),
        f"algorithms=[{','.join(LORA_METHODS)}]",
        "train.rounds=2",
        "data.validation_fraction=0.2",
    ]
    local, flower = tmp_path / "local", tmp_path / "flower"
    # Execute
    assert main(["run", *common, "--out", str(local), "--quiet"]) == 0
    assert main(["run", *common, "engine=flower", "--out", str(flower), "--quiet"]) == 0
    # Assert: the same final common adapter and per-client metrics (PF2LoRA and HETLoRA as the issue asks; all)
    a, b = json.loads((local / "results.json").read_text()), json.loads((flower / "results.json").read_text())
    for method in LORA_METHODS:
        _close(a[method]["clients"], b[method]["clients"])
        assert "val_accuracy" in b[method]["clients"]["0"]
        assert a[method]["effective_rank"] == b[method]["effective_rank"]
        x = load_file(str(local / "checkpoints" / method / "common.safetensors"))
        y = load_file(str(flower / "checkpoints" / method / "common.safetensors"))
        assert x.keys() == y.keys()
        assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-5, method
    # clients kept their own state on their disk (here the run directory) and exported their adapters
    for cid in range(3):
        assert (flower / "client_state" / "pf2lora" / f"client{cid}.r2.pt").is_file()
        assert (flower / "checkpoints" / "pf2lora" / f"personal_client{cid}.safetensors").is_file()
        assert (flower / "adapters" / "hetlora" / f"client{cid}" / "adapter_model.safetensors").is_file()
        # each client wrote its adapter's model card on its own disk, with its final metrics
        card = (flower / "adapters" / "fedsa_lora" / f"client{cid}" / "README.md").read_text()
        assert f"accuracy {b['fedsa_lora']['clients'][str(cid)]['accuracy']:.4f}" in card
    # bytes per round come from the messages: the same payloads both ways as the audit log saw them
    rounds = [json.loads(line) for line in (flower / "metrics.jsonl").read_text().splitlines()]
    audit = [json.loads(line) for line in (flower / "messages.jsonl").read_text().splitlines()]
    for record in rounds:
        sent = [
            m["bytes"]
            for m in audit
            if (m["method"], m["round"], m["kind"]) == (record["algorithm"], record["round"], "train")
        ]
        assert sorted(sent) == sorted(c["bytes_sent"] for c in record["clients"].values())
        assert all(c["bytes_received"] > 0 for c in record["clients"].values())
    assert rounds[-1]["eval_bytes"]["sent"] > 0
    # HETLoRA sent each client its own rank
    het = [r for r in rounds if r["algorithm"] == "hetlora"][0]
    assert len({c["parameters_received"] for c in het["clients"].values()}) > 1


@pytest.mark.integration
def test_flower_runs_the_model_heterogeneous_methods_like_the_local_engine(tmp_path: Path) -> None:
    common = [
        "configs/pfedlora_mnist.yaml",
        "algorithms=[pfedlora,local,fedavg]",
        "data.num_clients=3",
        "data.max_examples=300",
        "data.max_test_examples=120",
        "train.rounds=2",
        "train.local_steps=2",
        "train.threads=1",
    ]
    local, flower = tmp_path / "local", tmp_path / "flower"
    assert main(["run", *common, "--out", str(local), "--quiet"]) == 0
    assert main(["run", *common, "engine=flower", "--out", str(flower), "--quiet"]) == 0
    a, b = json.loads((local / "results.json").read_text()), json.loads((flower / "results.json").read_text())
    for method in ("pfedlora", "local", "fedavg"):
        _close(a[method]["clients"], b[method]["clients"])
    assert b["accounting"]["communication_fedavg_over_pfedlora"] > 5
    assert (flower / "checkpoints" / "pfedlora" / "adapter_client0.safetensors").is_file()


@pytest.mark.integration
def test_a_client_that_fails_is_recorded_and_the_run_goes_on(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    # Prepare: client 1 raises in round 2; two replies are enough
    common = [*_tiny(tiny_model_dir), "algorithms=[pf2lora]", "train.rounds=3", "flower.fail=[1@2]"]
    out = tmp_path / "run"
    # Execute
    assert main(["run", *common, "engine=flower", "flower.min_replies=2", "--out", str(out), "--quiet"]) == 0
    # Assert: the failure is in metrics.jsonl; the round went on with the others; client 1 came back
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["clients"]) for r in rounds] == [["0", "1", "2"], ["0", "2"], ["0", "1", "2"]]
    assert list(rounds[1]["failed"]) == ["1"] and "client 1 fails in round 2" in rounds[1]["failed"]["1"]
    assert "failed" not in rounds[0] and "failed" not in rounds[2]
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["pf2lora"]["clients"]) == ["0", "1", "2"]
    # the clients that answered kept their state: client 0's sampler went through 3 rounds, client 1's through 2
    from pf2lora.engines.states import DiskStates

    states = DiskStates(out / "client_state" / "pf2lora")
    assert states[0] != {} and states[1] != {}
    # with every client required, the same failure stops the run with one clear error
    capsys.readouterr()
    assert main(["run", *common, "engine=flower", "--out", str(tmp_path / "strict"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pf2lora round 2 (train): 2 of 3 clients answered with an update that passed the checks, at least 3" in err


@pytest.mark.integration
def test_bad_updates_are_rejected_on_flower_as_they_travelled(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: in round 1, client 1 adds a personal parameter and client 2 sends a tensor in float64
    faults = "flower.fail=[1@1:personal,2@1:dtype]"
    common = [*_tiny(tiny_model_dir), "algorithms=[homlora]", "train.rounds=2", faults, "flower.min_replies=1"]
    out = tmp_path / "run"
    # Execute
    assert main(["run", *common, "engine=flower", "--out", str(out), "--quiet"]) == 0
    # Assert: both rejected with their reasons, round 1 aggregated client 0 alone, round 2 everyone
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["clients"]) for r in rounds] == [["0"], ["0", "1", "2"]]
    assert sorted(rounds[0]["rejected"]) == ["1", "2"] and "rejected" not in rounds[1]
    assert "unexpected " in rounds[0]["rejected"]["1"] and ".personal" in rounds[0]["rejected"]["1"]
    assert "has dtype float64, expected float32" in rounds[0]["rejected"]["2"]


@pytest.mark.integration
def test_deployment_on_loopback(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare / Execute: a SuperLink and 3 SuperNodes (with their sites) as separate processes, `flwr run`,
    # 2 rounds of PF2LoRA
    out, work = tmp_path / "run", tmp_path / "federation"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "flower_loopback.py"),
            *_tiny(tiny_model_dir),
            "algorithms=[pf2lora]",
            "train.rounds=2",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Assert: results for every client
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["pf2lora"]["clients"]) == ["0", "1", "2"]
    assert all(0 <= c["accuracy"] <= 1 for c in results["pf2lora"]["clients"].values())
    # no personal parameter in any message the server received; only the common adapter came back
    audit = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    assert {m["kind"] for m in audit} == {"train", "evaluate", "query.save"}
    names = {name for m in audit for record in m["arrays"].values() for name in record}
    personal = set(load_file(str(work / "site0" / "checkpoints" / "pf2lora" / "personal_client0.safetensors")))
    assert personal and not names & personal and not any(".personal." in n for n in names)
    common = set(load_file(str(out / "checkpoints" / "pf2lora" / "common.safetensors")))
    assert names == common
    # personal state lives on each site's disk, none in the server's run directory
    assert not list(out.rglob("personal_*")) and not (out / "client_state").exists()
    for k in range(3):
        assert (work / f"site{k}" / "client_state" / "pf2lora" / f"client{k}.r2.pt").is_file()
    # one `pf2lora site` process served the 3 SuperNodes (the default); each of its task loops prepared the
    # experiment once, and the results are the local engine's
    prepared = [line for line in (work / "logs" / "sites.log").read_text().splitlines() if "prepared once" in line]
    assert len(prepared) == 3 and len({line.split("site ")[1].split(":")[1] for line in prepared}) == 3
    local = tmp_path / "local"
    overrides = [*_tiny(tiny_model_dir), "algorithms=[pf2lora]", "train.rounds=2"]
    assert main(["run", *overrides, "--out", str(local), "--quiet"]) == 0
    _close(json.loads((local / "results.json").read_text())["pf2lora"]["clients"], results["pf2lora"]["clients"])
    # every process the script started has stopped
    assert "had to kill" not in proc.stderr
    table = subprocess.run(["ps", "-e", "-o", "stat=,args="], capture_output=True, text=True).stdout.splitlines()
    flower = (
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
        "pf2lora site",
    )
    assert [line for line in table if not line.startswith("Z") and any(f in line for f in flower)] == []


def _secure_checks(out: Path, local: Path, methods: list[str]) -> None:
    """The common adapters of a SecAgg+ run are the plain means' (to SecAgg+'s quantisation), and no
    client's trained arrays reached the server in the clear."""
    for method in methods:
        secure = load_file(str(out / "checkpoints" / method / "common.safetensors"))
        plain = load_file(str(local / "checkpoints" / method / "common.safetensors"))
        assert secure.keys() == plain.keys()
        assert max(float((secure[k] - plain[k]).abs().max()) for k in plain) <= 1e-4, method
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secure_aggregation"] == {"clients": 3, "dropped": 0} for r in rounds)
    audit = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    assert "train" not in {m["kind"] for m in audit}  # every training reply went through SecAgg+ ...
    replies = [m for m in audit if m["kind"] == "train.secagg"]
    assert len(replies) == 4 * 3 * 2 * len(methods)  # 4 stages x 3 clients x 2 rounds
    assert all(not any(m["arrays"].values()) for m in replies)  # ... with no array in the clear


@pytest.mark.integration
def test_secure_aggregation_on_the_simulation_gives_the_plain_mean(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = [*_tiny(tiny_model_dir), "algorithms=[homlora,pf2lora]", "train.rounds=2"]
    out, local = tmp_path / "secure", tmp_path / "local"
    assert main(["run", *common, "engine=flower", "flower.secure_aggregation=true", "--out", str(out), "--quiet"]) == 0
    assert main(["run", *common, "--out", str(local), "--quiet"]) == 0
    _secure_checks(out, local, ["homlora", "pf2lora"])


@pytest.mark.integration
def test_secure_aggregation_on_the_loopback_deployment(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare / Execute: SecAgg+ between 3 SuperNodes (each with its own `pf2lora site` process, as on
    # separate machines, forking each message) and the server
    common = [*_tiny(tiny_model_dir), "algorithms=[homlora]", "train.rounds=2"]
    out, work, local = tmp_path / "run", tmp_path / "federation", tmp_path / "local"
    script = [sys.executable, str(REPO / "scripts" / "flower_loopback.py"), "--sites", "fork"]
    proc = subprocess.run(
        [*script, *common, "flower.secure_aggregation=true", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert main(["run", *common, "--out", str(local), "--quiet"]) == 0
    # Assert
    _secure_checks(out, local, ["homlora"])
    for k in range(3):  # each site process prepared the experiment once
        assert (work / "logs" / f"site{k}.log").read_text().count("prepared once") == 1
