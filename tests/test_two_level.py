"""The two-level adapter: forward = base + s B A u + s~ D C u; layout; initialisation; rank."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_two_level

from pf2lora.adapters.rank import delta_weights, effective_rank, effective_ranks, personal_to_common
from pf2lora.adapters.two_level import TwoLevelModel, find_target_modules
from pf2lora.config import ConfigError
from pf2lora.tasks.classification import Classification


def _random_params(model: TwoLevelModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {**model.initial_common(), **model.initial_personal(g)}
    return {k: v + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def test_adapted_layer_computes_base_plus_both_levels() -> None:
    # Prepare
    model = tiny_two_level()
    params = _random_params(model)
    module_path = model.layout.modules[0]
    layer = model.model.get_submodule(module_path)
    u = torch.randn(5, 16, dtype=torch.float64)
    a, b = params[f"{module_path}.lora_A.common.weight"], params[f"{module_path}.lora_B.common.weight"]
    c, d = params[f"{module_path}.lora_A.personal.weight"], params[f"{module_path}.lora_B.personal.weight"]
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    # Execute
    peft = model.peft_params(params)  # the fused PEFT adapter [A ; C], [s B | s~ D]
    sub = {k[len(module_path) + 1 :]: v for k, v in peft.items() if k.startswith(module_path + ".")}
    assert sub["lora_A.default.weight"].shape == (6, 16)  # rank r + r~, one branch
    out = torch.func.functional_call(layer, sub, (u,))
    # Assert: s = 8/4 = 2, s~ = 4/2 = 2
    expected = u @ w0.T + bias + 2.0 * u @ a.T @ b.T + 2.0 * u @ c.T @ d.T
    torch.testing.assert_close(out, expected)


def test_initial_adapters_reproduce_the_pretrained_model() -> None:
    base = tiny_bert()
    batch = random_batch()
    base.eval()
    with torch.no_grad():
        reference = base.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = TwoLevelModel(
        base, Classification(), ["query", "value"], rank=4, lora_alpha=8, personal_rank=2, personal_lora_alpha=4
    )
    model.train(False)
    params = {**model.initial_common(), **model.initial_personal(torch.Generator().manual_seed(0))}
    with torch.no_grad():
        torch.testing.assert_close(model.outputs(params, batch).logits, reference)


def test_layout_puts_head_in_x_or_y() -> None:
    shared = tiny_two_level()
    assert all("personal" not in n for n in shared.layout.x_names)
    assert any("classifier" in n for n in shared.layout.x_names)
    assert all("classifier" not in n for n in shared.layout.y_names)
    personal = TwoLevelModel(tiny_bert(), Classification(), ["query"], 4, 8, personal_rank=2, head="personal")
    assert any("classifier" in n for n in personal.layout.y_names)
    assert all("classifier" not in n for n in personal.layout.x_names)
    single = TwoLevelModel(tiny_bert(), Classification(), ["query"], 4, 8)
    assert single.layout.y_names == []


def test_module_parameters_are_frozen_and_initialised_like_lora() -> None:
    model = tiny_two_level()
    assert not any(p.requires_grad for p in model.model.parameters())
    x = model.initial_common()
    for name, tensor in x.items():
        if ".lora_B." in name:
            assert torch.count_nonzero(tensor) == 0
        if ".lora_A." in name:
            assert tensor.abs().max() <= 1 / 16**0.5 + 1e-12  # kaiming-uniform(a=sqrt 5) bound
    y1 = model.initial_personal(torch.Generator().manual_seed(1))
    y2 = model.initial_personal(torch.Generator().manual_seed(2))
    a_name = next(n for n in y1 if ".lora_A." in n)
    assert not torch.equal(y1[a_name], y2[a_name])


def test_unknown_target_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown target module.*qkv"):
        find_target_modules(tiny_bert(), ["query", "qkv"])


def test_effective_rank_90_percent_rule() -> None:
    # singular values 10, 5, 3, 2 (sum 20): top-2 hold 75%, top-3 hold 90%
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = torch.zeros(6, 5, dtype=torch.float64)
    s[0, 0], s[1, 1], s[2, 2], s[3, 3] = 10, 5, 3, 2
    assert effective_rank(u @ s @ v.T) == 3
    assert effective_rank(torch.zeros(4, 4)) == 0


def test_delta_weights_sum_both_levels() -> None:
    model = tiny_two_level()
    params = _random_params(model)
    module = model.layout.modules[0]
    a, b = params[f"{module}.lora_A.common.weight"], params[f"{module}.lora_B.common.weight"]
    c, d = params[f"{module}.lora_A.personal.weight"], params[f"{module}.lora_B.personal.weight"]
    torch.testing.assert_close(delta_weights(model.layout, params)[module], 2 * b @ a + 2 * d @ c)
    ranks = effective_ranks(model.layout, params)
    assert set(ranks) == {"layer.0.query", "layer.0.value", "layer.1.query", "layer.1.value"}
    assert all(1 <= r <= 6 for r in ranks.values())  # rank(BA + DC) <= r + r~ = 6


def test_personal_to_common_ratio_by_hand() -> None:
    """Every module: s B A = 2 * [[1, 0], [0, 0]] scaled by s = 2 (norm 2 per module), and
    s~ D C = 0.5 * [[0, 0], [0, 1]] scaled by s~ = 0.5 (norm 0.25 per module): the ratio of the
    summed squared norms is sqrt(2 * 0.0625 / (2 * 4)) = 0.125."""
    model = tiny_two_level()
    lo = model.layout
    layout = type(lo)(lo.modules[:2], 1, 1, 2.0, 0.5, lo.head_names, lo.head)
    params = {}
    for m in layout.modules:
        params[f"{m}.lora_A.common.weight"] = torch.tensor([[1.0, 0.0]])
        params[f"{m}.lora_B.common.weight"] = torch.tensor([[1.0], [0.0]])
        params[f"{m}.lora_A.personal.weight"] = torch.tensor([[0.0, 1.0]])
        params[f"{m}.lora_B.personal.weight"] = torch.tensor([[0.0], [0.5]])
    assert personal_to_common(layout, params) == pytest.approx(0.125)
    for m in layout.modules:  # a personal adapter that has not moved (D = 0)
        params[f"{m}.lora_B.personal.weight"] = torch.zeros(2, 1)
    assert personal_to_common(layout, params) == 0.0
