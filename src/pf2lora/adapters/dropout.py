"""Dropout masks drawn once and reused in a second pass over the same batch.

A finite-difference second-order term (PF2LoRA's mixed derivative, Per-FedAvg's Hessian-vector
product) compares gradients of the same minibatch at two parameter values; both passes must see
the same dropout masks, or the difference measures the noise rather than the change of the
parameters. Replaying the RNG state gives the same masks but draws them again, and on a CPU the
draws (Bernoulli samples for every hidden state and attention map) cost about a sixth of a
forward-backward pass of a BERT-sized encoder. :class:`DropoutMasks` keeps the masks of the first
pass and hands them to the second instead.

``record()``: every ``F.dropout`` / ``torch.dropout`` (so every ``nn.Dropout``) and the attention
dropout of ``F.scaled_dot_product_attention`` draws its mask exactly as PyTorch does (the same
Bernoulli draws from the same RNG, the same numbers: the math attention kernel that CPU attention
with dropout runs anyway) and keeps it as a boolean tensor. ``replay(rng)``: the same calls in the
same order reuse those masks and draw nothing. If the recorded pass drew random numbers any other
way (a model with stochastic depth, say), the replay falls back to restoring ``rng``, the RNG
state from before the recorded pass, and draws the masks again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from pf2lora.utils import set_rng_state

_DROPOUTS = {F.dropout, torch.dropout}
_ATTENTION = F.scaled_dot_product_attention
# any other way of drawing random numbers inside a recorded pass makes the recording unusable
_OTHER_RNG = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
    "bernoulli_", "multinomial", "normal", "normal_", "poisson", "uniform_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "feature_dropout", "native_dropout", "rrelu", "gumbel_softmax",
}  # fmt: skip


class DropoutMasks(TorchFunctionMode):
    """Record the dropout masks of one pass (``record``), reuse them in another (``replay``)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Tensor] = []
        self.replaying = False
        self.position = 0
        self.reusable = True

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.masks, self.replaying, self.reusable = [], False, True
        with self:
            yield

    @contextlib.contextmanager
    def replay(self, rng: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
        """Run the second pass with the recorded masks; ``rng`` (the RNG state from before the
        recorded pass, see :func:`pf2lora.utils.rng_state`) is restored instead when the recorded
        pass drew random numbers other than dropout masks."""
        if not self.reusable:
            set_rng_state(device, rng)
            yield
            return
        self.replaying, self.position = True, 0
        try:
            with self:
                yield
            if self.position != len(self.masks):
                raise RuntimeError(f"replayed pass used {self.position} of {len(self.masks)} recorded dropout masks")
        finally:
            self.replaying, self.masks = False, []

    # ------------------------------------------------------------------ interception
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            x, p, training, inplace = _dropout_args(func, args, kwargs)
            if training and p > 0:
                out = self._drop(x, p)
                return x.copy_(out) if inplace else out
        elif func is _ATTENTION:
            dropout_p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if dropout_p > 0:
                return self._attention(*args, **kwargs)
        elif self.reusable and not self.replaying and getattr(func, "__name__", "") in _OTHER_RNG:
            self.reusable = False
        return func(*args, **kwargs)

    def _drop(self, x: Tensor, p: float) -> Tensor:
        """``torch.dropout(x, p, True)``: x times Bernoulli(1 - p) / (1 - p), recorded or replayed."""
        if self.replaying:
            if self.position >= len(self.masks) or self.masks[self.position].shape != x.shape:
                raise RuntimeError("replayed pass does not match the recorded one (dropout masks differ)")
            mask = self.masks[self.position]
            self.position += 1
            # the recorded noise (0 or 1/(1-p), rounded as torch rounds it) rebuilt from the boolean
            # mask, then one multiplication: PyTorch's own arithmetic, forward and backward, to the
            # bit. Multiplying by the boolean mask directly costs about twice as much: each mixed
            # bool * float product, forward and backward, casts the mask again.
            return x * mask.to(x.dtype).mul_(torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p))
        noise = torch.empty_like(x).bernoulli_(1 - p)  # torch's own draw (ATen _dropout_impl)
        self.masks.append(noise.bool())
        return x * noise.div_(1 - p)

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """PyTorch's math attention kernel (``_scaled_dot_product_attention_math``), the one CPU
        attention with dropout runs, with its dropout mask recorded or replayed."""
        length, source = query.size(-2), key.size(-2)
        if is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                attn_mask.logical_not(), float("-inf")
            )
        if enable_gqa and key.size(-3) != query.size(-3):
            groups = query.size(-3) // key.size(-3)
            key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        factor = math.sqrt(scale if scale is not None else 1 / math.sqrt(query.size(-1)))
        attn = torch.matmul(query * factor, key.transpose(-2, -1) * factor)
        if attn_mask is not None:
            attn = attn + attn_mask
        # PyTorch's kernel calls _safe_softmax: zeros for a row of scores that is all -inf, where
        # softmax gives NaN; on every other row it is softmax, at 3 to 4 times the cost (more
        # passes over the scores: isneginf, all, where). With finite queries and keys only the
        # mask can make a whole row -inf, so the safe form runs where the mask does.
        if attn_mask is not None and bool(torch.isneginf(attn_mask).all(-1).any()):
            attn = torch.ops.aten._safe_softmax(attn, -1)
        else:
            attn = torch.softmax(attn, -1)
        return torch.matmul(self._drop(attn, dropout_p), value)


def _dropout_args(func, args, kwargs) -> tuple[Tensor, float, bool, bool]:
    """(input, p, training, inplace) of ``torch.dropout(input, p, train)`` or
    ``F.dropout(input, p=0.5, training=True, inplace=False)``."""
    if func is torch.dropout:
        bound = {"p": 0.5, "train": True, **dict(zip(("input", "p", "train"), args)), **kwargs}
        return bound["input"], float(bound["p"]), bool(bound["train"]), False
    bound = {"p": 0.5, "training": True, "inplace": False}
    bound.update({**dict(zip(("input", "p", "training", "inplace"), args)), **kwargs})
    return bound["input"], float(bound["p"]), bool(bound["training"]), bool(bound["inplace"])
