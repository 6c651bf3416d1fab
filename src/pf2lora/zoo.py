"""Heterogeneous local models for pFedLoRA: a body giving a representation of a shared dimension d,
then the client's own head.

- ``cnn1`` .. ``cnn5``: the pFedLoRA paper's five CNNs, conv5x5(16) -> ReLU -> maxpool2 ->
  conv5x5(c2) -> ReLU -> maxpool2 -> fc1 -> ReLU -> fc2(d) -> ReLU, with (c2, fc1) =
  (32, 2000), (16, 2000), (32, 1000), (32, 800), (32, 500); the head is fc3(d -> classes).
- ``encoder-N``: the text encoder of ``model.name`` (all-MiniLM-L6-v2 by default) truncated to
  its first N layers, mean-pooled over the tokens; d is its hidden size (384).
- ``module.path:factory``: your own; ``factory()`` returns any ``nn.Module`` that maps the images
  (a ``(batch, C, H, W)`` tensor), or ``input_ids=..., attention_mask=...`` for text, to a
  ``(batch, d)`` representation.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pf2lora.config import ConfigError
from pf2lora.utils import stable_seed

CNNS = {"cnn1": (32, 2000), "cnn2": (16, 2000), "cnn3": (32, 1000), "cnn4": (32, 800), "cnn5": (32, 500)}


class CNN(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], conv2: int, fc1: int, rep_dim: int = 500) -> None:
        super().__init__()
        channels, height, width = in_shape
        pad = 2 if min(height, width) < 28 else 0  # small images (8 x 8 digits) keep their size
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, conv2, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, fc1), nn.ReLU(), nn.Linear(fc1, rep_dim), nn.ReLU())

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.fc(self.features(batch["pixel_values"]))


class TruncatedEncoder(nn.Module):
    """The first ``depth`` layers of a pretrained encoder, mean-pooled over the attention mask."""

    def __init__(self, name: str, depth: int) -> None:
        super().__init__()
        from transformers import AutoModel

        from pf2lora.models import quiet_loading, resolve

        try:
            with quiet_loading():  # the unused pooler's weights are expected: it is not built
                model = AutoModel.from_pretrained(resolve(name), add_pooling_layer=False)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"cannot load encoder {name!r}: {str(err).splitlines()[0][:200]}") from None
        layers = model.encoder.layer
        if not 1 <= depth <= len(layers):
            raise ConfigError(f"encoder-{depth}: {name} has {len(layers)} layers")
        model.encoder.layer = layers[:depth]
        model.config.num_hidden_layers = depth
        self.encoder = model

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        kwargs = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=mask, **kwargs).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class UserBody(nn.Module):
    """A user's module, called on the images tensor (or the token ids and mask) of a batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "pixel_values" in batch:
            return self.module(batch["pixel_values"])
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


class LocalModel(nn.Module):
    """A client's own model: ``body`` (batch -> z in R^d) and ``head`` (d -> classes)."""

    def __init__(self, body: nn.Module, rep_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(rep_dim, num_classes)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self.body(batch)
        return z, self.head(z)


def build_body(name: str, in_shape: tuple[int, ...] | None, rep_dim: int, encoder: str = "bundled") -> nn.Module:
    """The body called ``name`` (see the module docstring); raises ConfigError for unknown names."""
    if name in CNNS:
        if in_shape is None or len(in_shape) != 3:
            raise ConfigError(f"model {name} is a CNN for images; this dataset is not an image set")
        return CNN(in_shape, *CNNS[name], rep_dim=rep_dim)
    if name.startswith("encoder-"):
        try:
            depth = int(name.split("-", 1)[1])
        except ValueError:
            raise ConfigError(f"model {name!r}: expected encoder-N with N the number of layers") from None
        if in_shape is not None:
            raise ConfigError(f"model {name} is a text encoder; this dataset is an image set")
        return TruncatedEncoder(encoder, depth)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"cannot import model factory {name!r}: {err}") from None
        body = factory()
        if not isinstance(body, nn.Module):
            raise ConfigError(f"model factory {name!r} returned {type(body).__name__}, not an nn.Module")
        return UserBody(body)
    raise ConfigError(f"unknown model {name!r} (choose from {', '.join(CNNS)}, encoder-N, or module.path:factory)")


class ModelZoo:
    """Which architecture each client has (``names[k mod len(names)]``) and each client's initial
    weights. One module per architecture serves every client that has it; a client's own weights
    are loaded into it when the client trains or predicts."""

    def __init__(
        self,
        names: list[str],
        num_clients: int,
        in_shape: tuple[int, ...] | None,
        rep_dim: int,
        num_classes: int,
        seed: int = 0,
        encoder: str = "bundled",
    ) -> None:
        self.names = [names[k % len(names)] for k in range(num_clients)]
        self.in_shape, self.rep_dim, self.num_classes, self.seed, self.encoder = (
            in_shape,
            rep_dim,
            num_classes,
            seed,
            encoder,
        )
        self.modules: dict[str, LocalModel] = {}
        for name in dict.fromkeys(self.names):
            torch.manual_seed(stable_seed(seed, "architecture", name))
            self.modules[name] = LocalModel(build_body(name, in_shape, rep_dim, encoder), rep_dim, num_classes)

    def module(self, client_id: int) -> LocalModel:
        return self.modules[self.names[client_id]]

    def initial_state(self, client_id: int) -> dict[str, Tensor]:
        """Fresh weights for this client, seeded per client (a pretrained body keeps its weights)."""
        name = self.names[client_id]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed, "local model", client_id))
            if name.startswith("encoder-"):
                head = nn.Linear(self.rep_dim, self.num_classes)
                body = {k: v for k, v in self.modules[name].state_dict().items() if not k.startswith("head.")}
                state = {**body, **{f"head.{k}": v for k, v in head.state_dict().items()}}
            else:
                body = build_body(name, self.in_shape, self.rep_dim, self.encoder)
                state = LocalModel(body, self.rep_dim, self.num_classes).state_dict()
        return {k: v.detach().clone() for k, v in state.items()}

    def check(self, client_id: int, batch: Mapping[str, Tensor]) -> None:
        """A clear error when a client's model does not give a (batch, d) representation."""
        name = self.names[client_id]
        with torch.no_grad():
            try:
                z = self.modules[name].body(batch)
            except Exception as err:  # noqa: BLE001 - any failure of a user's model on our data
                raise ConfigError(f"client {client_id}'s model {name!r} fails on its data: {err}") from None
        expected = (len(batch["labels"]), self.rep_dim)
        if not isinstance(z, Tensor) or tuple(z.shape) != expected:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ConfigError(
                f"client {client_id}'s model {name!r} gives a representation of shape {shape}; "
                f"pFedLoRA needs {expected} (pfedlora.rep_dim = {self.rep_dim})"
            )
