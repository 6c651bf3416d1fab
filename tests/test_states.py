"""Packed client states: exact round trip, one buffer per dtype, stored state never mutated."""

from __future__ import annotations

import torch

from pf2lora.engines.states import DiskStates, PackedStates, pack, unpack


def _state() -> dict:
    return {
        "personal": {"a": torch.randn(3, 4), "b": torch.zeros(4, 2)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}],
        },
        "cursor": {"epoch": 1, "pos": 7},
        "ids": torch.arange(4),
    }


def test_pack_round_trip_is_exact() -> None:
    state = _state()
    packed = pack(state)
    assert set(packed.buffers) == {torch.float32, torch.int64}
    assert packed.buffers[torch.float32].numel() == 12 + 8 + 1 + 5
    back = unpack(packed)
    torch.testing.assert_close(back["personal"]["a"], state["personal"]["a"], rtol=0, atol=0)
    torch.testing.assert_close(back["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    assert back["cursor"] == {"epoch": 1, "pos": 7} and back["optimizer"]["param_groups"] == [
        {"lr": 1e-3, "params": [0]}
    ]
    torch.testing.assert_close(back["ids"], torch.arange(4))


def test_in_place_changes_do_not_reach_the_stored_state() -> None:
    states = PackedStates()
    states[0] = _state()
    first = states[0]
    first["personal"]["a"].add_(100.0)
    assert states[0]["personal"]["a"].abs().max() < 100
    assert list(states) == [0] and len(states) == 1


def test_a_packed_state_is_held_and_mirrored_as_it_came(tmp_path) -> None:
    # what a worker's reply carries is stored without unpacking and packing it again
    states = PackedStates(DiskStates(tmp_path))
    states.round = 3
    packed = pack(_state())
    states.write(0, packed)
    assert states.packed(0) is packed
    torch.testing.assert_close(states.mirror[0]["personal"]["a"], packed_view(packed), rtol=0, atol=0)
    states.rollback(3)  # read back from the mirror: the same values
    torch.testing.assert_close(states[0]["personal"]["a"], packed_view(packed), rtol=0, atol=0)


def packed_view(packed) -> torch.Tensor:
    return unpack(packed)["personal"]["a"]


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path) -> None:
    # Arrange: a file, and a write that dies half-way
    from pf2lora.utils import atomic_write

    path = tmp_path / "round.pt"
    atomic_write(path, lambda tmp: torch.save({"round": 1}, tmp))

    def dies(tmp):
        tmp.write_bytes(b"half of a checkpoint")
        raise KeyboardInterrupt

    # Act
    try:
        atomic_write(path, dies)
    except KeyboardInterrupt:
        pass
    # Assert: the old content, and no temporary file left beside it
    assert torch.load(path) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["round.pt"]
