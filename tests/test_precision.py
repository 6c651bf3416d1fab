"""model.dtype: a bf16 (or fp16) frozen base under fp32 adapters, head, losses and hypergradients."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import random_batch, tiny_bert
from test_generation import tiny_lm

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.pf2lora import PF2LoRAClient
from pf2lora.config import ConfigError, TaskConfig, TrainConfig, load_config
from pf2lora.precision import (
    FD_EPSILON,
    CastLinear,
    fast_bf16,
    fd_epsilon,
    lower_precision,
    resolve_dtype,
)
from pf2lora.tasks.classification import Classification
from pf2lora.tasks.generation import Generation


def _model(dtype: str, dropout: float = 0.0) -> TwoLevelModel:
    torch.manual_seed(0)
    return TwoLevelModel(
        tiny_bert(dropout=dropout),
        Classification(),
        ["query", "value"],
        rank=4,
        lora_alpha=8,
        personal_rank=2,
        personal_lora_alpha=4,
        dtype=dtype,
    )


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_frozen_linear_layers_in_bf16_everything_trained_in_fp32() -> None:
    low, full = _model("bfloat16"), _model("float32")
    weights = dict(low.model.named_parameters())
    frozen = [n for n in weights if n.endswith("base_layer.weight") or ".intermediate.dense." in n]
    assert frozen and all(weights[n].dtype == torch.bfloat16 for n in frozen)
    assert weights["base_model.model.bert.embeddings.word_embeddings.weight"].dtype == torch.float32
    assert all(weights[n].dtype == torch.float32 for n in weights if ".LayerNorm." in n)
    assert all(weights[n].dtype == torch.float32 for n in weights if "classifier" in n)  # the trained head
    assert low.dtype == torch.bfloat16
    # the adapters' init is drawn in fp32 before the base is lowered: the same as the fp32 model's
    x_low, x_full = low.initial_common(), full.initial_common()
    assert all(t.dtype == torch.float32 for t in x_low.values())
    assert all(torch.equal(x_low[k], x_full[k]) for k in x_full)
    # the loss and the gradients of the trained tensors are fp32, close to the fp32 model's
    params = {**x_low, **low.initial_personal(torch.Generator().manual_seed(1))}
    batch = random_batch()
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = low.loss(leaves, batch)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert all(g.dtype == torch.float32 for g in grads)
    full_leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    full_loss = full.loss(full_leaves, batch)
    full_grads = torch.autograd.grad(full_loss, list(full_leaves.values()))
    assert abs(loss.item() - full_loss.item()) < 2e-2 * abs(full_loss.item())
    assert _cos(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in full_grads])) > 0.999


def test_float32_changes_nothing() -> None:
    model = _model("float32")
    assert not any(isinstance(m, CastLinear) for m in model.model.modules())
    assert lower_precision(tiny_bert(), torch.float32) == 0


def test_mlp_first_half_feeds_second_half_in_low_dtype() -> None:
    base = tiny_bert()
    lower_precision(base, torch.bfloat16, keep=["classifier"])
    layer = base.bert.encoder.layer[0]
    assert layer.intermediate.dense.output_dtype is None  # GELU in bf16, straight into output.dense
    assert layer.output.dense.output_dtype == torch.float32
    assert layer.attention.output.dense.output_dtype == torch.float32
    x = torch.randn(2, 3, 16)
    assert layer.intermediate.dense(x).dtype == torch.bfloat16
    assert layer.output(layer.intermediate(x), x).dtype == torch.float32
    assert base.classifier.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_output_layer_untied_and_lowered(kind: str) -> None:
    model = tiny_lm(kind, vocab=40)
    embeddings = model.get_input_embeddings().weight
    lower_precision(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_input_embeddings().weight is embeddings  # the embeddings keep their fp32 weight
    if kind == "gpt2":  # Conv1D layers, and their MLP pair
        mlp = model.transformer.h[0].mlp
        assert type(mlp.c_fc).__name__ == "CastConv1D" and mlp.c_fc.output_dtype is None
        assert mlp.c_proj.output_dtype == torch.float32
        pickle.loads(pickle.dumps(mlp.c_fc))  # the cast class is importable by name
    else:
        mlp = model.model.layers[0].mlp
        assert mlp.gate_proj.output_dtype is None and mlp.up_proj.output_dtype is None
        assert mlp.down_proj.output_dtype == torch.float32
    ids = torch.randint(2, 40, (2, 6))
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_generation_model_in_bf16_through_two_level_adapters() -> None:
    class _Tokenizer:  # the task needs only its end-of-sequence id here
        eos_token_id, pad_token_id = 1, 0

    task = Generation(TaskConfig(), _Tokenizer(), 0)
    model = TwoLevelModel(tiny_lm("llama", 40), task, ["q_proj", "v_proj"], 4, 8, 2, 4, dtype="bfloat16")
    params = {**model.initial_common(), **model.initial_personal(torch.Generator().manual_seed(0))}
    ids = torch.randint(2, 40, (2, 6))
    out = model.generate(params, input_ids=ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_hypergradient_in_bf16_against_fp32_exact() -> None:
    """The finite-difference hypergradient with the bf16 base, at the step sized for bf16, agrees
    with the exact one of the fp32 model (cosine >= 0.999); so does the exact one in bf16."""
    full, low = _model("float32"), _model("bfloat16")
    g = torch.Generator().manual_seed(3)
    x = {k: v + 1.0 * torch.randn(v.shape, generator=g) for k, v in full.initial_common().items()}
    y = {k: v + 1.0 * torch.randn(v.shape, generator=g) for k, v in full.initial_personal(g).items()}
    pi, xi = random_batch(seed=1), random_batch(seed=2)

    def hypergradient(model: TwoLevelModel, mode: str) -> torch.Tensor:
        client = PF2LoRAClient(model, TrainConfig(lower_lr=10.0, hypergradient=mode))
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        _, h, _ = client.bilevel_step(leaves, y, pi, xi, None, mode)
        return torch.cat([h[k].flatten() for k in sorted(h)])

    reference = hypergradient(full, "exact")
    first_order = hypergradient(full, "first_order")
    assert _cos(first_order, reference) < 0.995  # the mixed term matters at this point: the check can fail
    assert _cos(hypergradient(low, "finite_difference"), reference) >= 0.999
    assert _cos(hypergradient(low, "exact"), reference) >= 0.999


def test_finite_difference_step_by_dtype() -> None:
    point = {"C": torch.full((5, 5), 1.0, requires_grad=True)}  # norm 5; a leaf of a step's graph
    small = {"C": torch.full((1,), 0.1)}
    assert fd_epsilon(None, _model("float32"), point) == FD_EPSILON == 1e-3
    assert fd_epsilon(None, _model("bfloat16"), point) == pytest.approx(5e-2)  # a share of ||y||
    assert fd_epsilon(None, _model("bfloat16"), small) == pytest.approx(1e-2)  # at least 1e-2
    assert fd_epsilon(5e-4, _model("bfloat16"), point) == 5e-4  # a configured step is kept
    assert fd_epsilon(None, object(), point) == 1e-3  # a model without a dtype: fp32


def test_pfedlora_refuses_a_low_precision_base() -> None:
    from pf2lora.runner import prepare

    cfg = load_config("configs/default.yaml", ["algorithms=[pfedlora]", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="pfedlora's client models train whole in float32"):
        prepare(cfg)


def test_auto_dtype_follows_the_hardware() -> None:
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if fast_bf16("cpu") else torch.float32)
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("int8", "cpu")


def test_bad_dtype_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="model.dtype must be auto, float32, bfloat16 or float16"):
        load_config("configs/default.yaml", ["model.dtype=half"])
