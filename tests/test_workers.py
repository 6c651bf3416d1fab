"""The local engine's worker processes: the same results as one process, a killed worker named by
its client with every other client's state kept, errors raised where they happen, bad settings."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import tiny_two_level, token_clients

from pf2lora.algorithms.base import ClientState, Instruction
from pf2lora.algorithms.homlora import HomLoRAClient, HomLoRAServer
from pf2lora.algorithms.pf2lora import PF2LoRAClient, PF2LoRAServer
from pf2lora.config import ConfigError, TrainConfig
from pf2lora.engines.local import LocalEngine
from pf2lora.engines.workers import WorkerDied
from pf2lora.parallelism import Plan, in_process, plan

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes are forked")


def _engine(algorithm: str, workers: int, client_cls=None, clients: int = 4) -> LocalEngine:
    model = tiny_two_level(personal_rank=2 if algorithm == "pf2lora" else 0, dropout=0.1)
    cfg = TrainConfig(local_steps=2, batch_size=4, lower_lr=0.5, eval_batch_size=7)
    server_cls, default_client = (
        (PF2LoRAServer, PF2LoRAClient) if algorithm == "pf2lora" else (HomLoRAServer, HomLoRAClient)
    )
    data = token_clients(clients)
    client = (client_cls or default_client)(model, cfg, seed=5)
    pool = Plan(workers, 1) if workers > 1 else None
    return LocalEngine(server_cls(model.initial_common()), client, data, data, workers=pool)


@pytest.mark.parametrize("algorithm", ["pf2lora", "homlora"])
def test_two_workers_give_the_sequential_run(algorithm: str) -> None:
    """Same threads per client (one), same bits: metrics, ranks, global and personal parameters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for workers in (1, 2):
            engine = _engine(algorithm, workers)
            records: list[dict] = []
            metrics, ranks = engine.run(2, eval_every=1, on_round=records.append)
            runs.append((engine, metrics, ranks, records))
    finally:
        torch.set_num_threads(threads)
    (one, m1, r1, rec1), (two, m2, r2, rec2) = runs
    assert m1 == m2 and r1 == r2
    assert [r["clients"] for r in rec1] == [r["clients"] for r in rec2]
    for name, value in one.server.global_params.items():
        assert torch.equal(value, two.server.global_params[name]), name
    for cid in range(4):
        s1, s2 = one.states[cid], two.states[cid]
        for name, value in s1.get("personal", {}).items():
            assert torch.equal(value, s2["personal"][name]), (cid, name)
    assert two.pool is not None and two.pool.pids == []  # stopped when the run ended


class _DiesOnClient2(HomLoRAClient):
    """Client 2's worker process is killed (SIGKILL) in round 1, as by the out-of-memory killer."""

    def train(self, client_id: int, instruction: Instruction, state: ClientState, data):  # type: ignore[override]
        if client_id == 2 and instruction.config.get("server_round") == 1 and os.getpid() != PARENT:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train(client_id, instruction, state, data)


PARENT = os.getpid()


def test_a_killed_worker_is_named_by_its_client_and_the_others_keep_their_state() -> None:
    engine = _engine("homlora", 2, _DiesOnClient2)
    with engine:
        record = engine.train_round(1)
        assert set(record["failed"]) == {2} and "SIGKILL" in record["failed"][2]
        assert set(record["clients"]) == {0, 1, 3}
        # client 2 keeps the state it had before the round; the others keep what they trained
        assert engine.states[2]["optimizer"] is None and engine.states[2]["cursor"]["pos"] == 0
        assert all(engine.states[c]["optimizer"] is not None for c in (0, 1, 3))
        record = engine.train_round(2)  # a fresh worker replaced the dead one: every client trains
        assert "failed" not in record and set(record["clients"]) == {0, 1, 2, 3}
        assert engine.states[2]["optimizer"] is not None


class _RaisesOnClient1(HomLoRAClient):
    def train(self, client_id, instruction, state, data):  # type: ignore[override]
        if client_id == 1:
            raise ValueError("client 1's data is broken")
        return super().train(client_id, instruction, state, data)


def test_an_error_in_a_worker_is_raised_in_the_engine_with_its_traceback() -> None:
    engine = _engine("homlora", 2, _RaisesOnClient1)
    with pytest.raises(ValueError, match="client 1's data is broken") as caught, engine:
        engine.train_round(1)
    assert any("worker process of client 1" in note for note in caught.value.__notes__)


def test_no_client_finishing_a_round_is_an_error() -> None:
    class DiesAlways(HomLoRAClient):
        def train(self, client_id, instruction, state, data):  # type: ignore[override]
            if os.getpid() != PARENT:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().train(client_id, instruction, state, data)

    engine = _engine("homlora", 2, DiesAlways, clients=2)
    with pytest.raises(WorkerDied, match="no client finished"), engine:
        engine.train_round(1)


def test_plan_fills_the_cores_and_never_exceeds_the_clients() -> None:
    assert plan(None, None, clients=4, cores=2) == Plan(2, 1)
    assert plan(None, None, clients=4, cores=16) == Plan(4, 4)
    assert plan(None, 2, clients=10, cores=16) == Plan(8, 2)
    assert plan(None, None, clients=1, cores=8) == Plan(1, 8)  # pooled training: one worker, every core
    assert plan(1, None, clients=4, cores=8) == Plan(0, None)  # in this process
    assert plan(None, 3, clients=4, cores=1) == Plan(0, 3)
    assert plan(3, None, clients=4, cores=1) == Plan(3, 1)  # asked for explicitly
    assert in_process(None, cores=1) and not in_process(None, cores=2) and in_process(1, cores=16)


def test_bad_worker_settings_fail_before_any_work(monkeypatch) -> None:
    from pf2lora.config import load_config
    from pf2lora.families import check_runtime

    with pytest.raises(ConfigError, match="train.workers must be >= 1"):
        load_config("configs/default.yaml", ["train.workers=0"])
    monkeypatch.setenv("PF2LORA_CORES", "2")
    cfg = load_config("configs/default.yaml", ["train.workers=2", "train.threads=2"])
    with pytest.raises(ConfigError, match="2 x 2 exceeds the 2 cores"):
        check_runtime(cfg)
    # forked CPU workers cannot share a CUDA device (torch told it has one: this machine has none)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config("configs/default.yaml", ["train.workers=2", "train.threads=1", "model.device=cuda"])
    with pytest.raises(ConfigError, match="cannot share a CUDA device"):
        check_runtime(cfg)


def test_the_default_is_one_worker_per_core_and_one_process_on_a_gpu(monkeypatch, tmp_path) -> None:
    from pf2lora.config import load_config
    from pf2lora.engines.local import local_engine

    monkeypatch.setenv("PF2LORA_CORES", "2")
    cfg = load_config("configs/default.yaml")
    assert cfg.train.workers is None
    data = [object()] * 4
    built = local_engine(tmp_path, "homlora", cfg, None, None, data, data, None)  # type: ignore[arg-type]
    assert built.pool is not None and (built.pool.size, built.pool.threads) == (2, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_engine(tmp_path, "homlora", cfg, None, None, data, data, None).pool is None  # type: ignore[arg-type]


def test_a_task_carries_the_client_state_once_not_once_per_tensor(monkeypatch) -> None:
    """A held state's tensors are views of one buffer per dtype; pickled as they are, each view
    would carry the whole buffer (a PF2LoRA state of 0.7 MB crossed the pipe as 70 MB)."""
    import pickle

    from pf2lora.engines import workers as pool_module
    from pf2lora.engines.states import pack

    # Arrange: every message to and from a worker measured
    sent: list[int] = []
    send, receive = pool_module._Worker.send, pool_module._Worker.receive

    def measured_send(self, task):
        sent.append(len(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)))
        send(self, task)

    replies: list[int] = []

    def measured_receive(self):
        value = receive(self)
        replies.append(len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
        return value

    monkeypatch.setattr(pool_module._Worker, "send", measured_send)
    monkeypatch.setattr(pool_module._Worker, "receive", measured_receive)
    engine = _engine("pf2lora", 2)
    # Act: two rounds (the second's states hold optimizer moments and a personal adapter)
    engine.run(2, eval_every=1)
    # Assert: no message is much larger than the largest state plus the common adapter it carries
    state_bytes = max(len(pickle.dumps(pack(engine.states[c]))) for c in range(4))
    common_bytes = len(pickle.dumps(engine.server.global_params))
    assert sent and replies
    assert max(sent + replies) < 2 * (state_bytes + common_bytes), (max(sent + replies), state_bytes, common_bytes)
