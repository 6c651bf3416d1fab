"""DropoutMasks: a recorded pass is the plain pass (same numbers, same RNG draws); a replayed pass
reuses its masks without drawing; other random draws make the replay fall back to the RNG state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_bert

from pf2lora.adapters.dropout import DropoutMasks
from pf2lora.utils import rng_state


def _model():
    model = tiny_bert(dropout=0.3)
    model.train(True)
    batch = random_batch(seed=4)
    batch["attention_mask"][:, -2:] = 0  # padding: the attention mask is used too
    batch.pop("labels")
    return model, batch


def _recorded(seed: int, forward):
    """(masks, RNG state before the pass, output) of ``forward()`` recorded from ``seed``."""
    masks = DropoutMasks()
    torch.manual_seed(seed)
    rng = rng_state(torch.device("cpu"))
    with masks.record():
        out = forward()
    return masks, rng, out


def _grads(model, logits: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(logits.square().sum(), list(model.parameters())))


def test_recorded_pass_is_the_plain_pass_and_replay_reuses_its_masks() -> None:
    model, batch = _model()
    torch.manual_seed(5)
    plain = model(**batch).logits
    plain_grads = _grads(model, plain)
    after_plain = torch.get_rng_state()
    masks, rng, recorded = _recorded(5, lambda: model(**batch).logits)
    assert torch.equal(recorded, plain)  # the same draws and the same arithmetic as PyTorch's own
    assert torch.equal(torch.get_rng_state(), after_plain)
    # 2 layers x (attention map, attention output, FFN output), the embeddings, the classifier
    assert len(masks.masks) == 2 * 3 + 2
    with masks.replay(rng, torch.device("cpu")):
        replayed = model(**batch).logits
    assert torch.equal(replayed, plain)
    assert torch.equal(torch.get_rng_state(), after_plain)  # nothing drawn
    # and the backward through the replayed masks is PyTorch's own, to the bit
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, replayed), plain_grads, strict=True))
    torch.manual_seed(6)
    assert not torch.equal(model(**batch).logits, plain)  # other masks give other logits: the checks can fail


def test_replay_follows_a_change_of_the_parameters_with_the_same_masks() -> None:
    model, batch = _model()
    masks, rng, _ = _recorded(1, lambda: model(**batch))
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)
        model.classifier.bias.zero_()
    with masks.replay(rng, torch.device("cpu")):
        replayed = model(**batch).logits
    torch.manual_seed(1)  # the same masks drawn again from the same RNG state
    assert torch.equal(replayed, model(**batch).logits)


def test_other_random_draws_fall_back_to_the_rng_state() -> None:
    model, batch = _model()
    masks, rng, first = _recorded(2, lambda: model(**batch).logits + 0 * torch.rand(1))  # e.g. stochastic depth
    assert not masks.reusable
    with masks.replay(rng, torch.device("cpu")):
        second = model(**batch).logits + 0 * torch.rand(1)
    assert torch.equal(first, second)


def test_a_replay_that_does_not_match_the_recording_is_an_error() -> None:
    masks = DropoutMasks()
    x = torch.ones(4, 3)
    with masks.record():
        F.dropout(x, 0.5)
    with pytest.raises(RuntimeError, match="does not match"), masks.replay(rng_state(torch.device("cpu")), x.device):
        F.dropout(torch.ones(5, 3), 0.5)
    with masks.record():
        F.dropout(x, 0.5)
        F.dropout(x, 0.5)
    with pytest.raises(RuntimeError, match="used 1 of 2"), masks.replay(rng_state(torch.device("cpu")), x.device):
        F.dropout(x, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"attn_mask": torch.tensor([True, True, True, False]).expand(4, 4)},
        {"attn_mask": torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), "scale": 0.3},
        # a query that may see no key: PyTorch's safe softmax gives it zeros, not NaN
        {"attn_mask": torch.tensor([[True] * 4, [False] * 4, [True, False, True, False], [False, False, False, True]])},
    ],
)
def test_attention_with_dropout_matches_pytorch(kwargs: dict) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))
    torch.manual_seed(9)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, **kwargs)
    torch.manual_seed(9)
    with DropoutMasks().record():
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not got.isnan().any()
