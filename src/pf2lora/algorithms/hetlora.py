"""HETLoRA (Cho et al. 2024, arXiv 2401.06432, as described in PF2LoRA's Section 3): heterogeneous
ranks, distribution by truncation, self-pruning, sparsity-weighted aggregation.

- Initial ranks ``r_k = r_min + floor((r_max - r_min) (k - 1) / M)``, k = 1..M, or a given list.
- The server holds A (r_max x n) and B (m x r_max) per module; client k gets ``A[:r_k]``,
  ``B[:, :r_k]`` (and the shared head).
- Local AdamW on ``F_k + lambda * sum_modules ||B[:, q:]||_F ||A[q:, :]||_F``, q = ceil(gamma r_k)
  (a differentiable term). After local training, if that tail norm fell below its value at
  receipt, the client prunes: ``r_k <- max(r_min, q)``, and sends ``A[:r_k]``, ``B[:, :r_k]``.
- The server zero-pads every reply to r_max and averages with
  ``p_k = ||dW_k||_F / sum_j ||dW_j||_F``, ``dW_k = B_k A_k`` over all modules:
  ``A <- sum_k p_k A_k``, ``B <- sum_k p_k B_k`` (the old global adapter is not added back in).
  The head is averaged uniformly. The scaling of every client is the same (lora_alpha / rank of
  the config), so truncation does not rescale what a client learned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pf2lora.adapters.two_level import COMMON, AdapterLayout, TwoLevelModel
from pf2lora.algorithms.base import (
    AdapterModel,
    ClientData,
    ClientState,
    Instruction,
    Params,
    ServerAlgorithm,
    TrainResult,
    structure_problem,
)
from pf2lora.algorithms.fedavg import sample_clients
from pf2lora.algorithms.lora_client import LoRAClient, lora_model
from pf2lora.config import ExperimentConfig, HetLoRAConfig, TrainConfig
from pf2lora.tasks.base import Task
from pf2lora.utils import clone_params, weighted_average


def initial_ranks(num_clients: int, r_min: int, r_max: int, ranks: list[int] | None = None) -> list[int]:
    """``r_k = r_min + floor((r_max - r_min)(k - 1) / M)`` for k = 1..M, unless given."""
    if ranks is not None:
        return list(ranks)
    return [r_min + (r_max - r_min) * (k - 1) // num_clients for k in range(1, num_clients + 1)]


def truncate(params: Params, rank: int) -> Params:
    """First ``rank`` rows of every ``lora_A`` and columns of every ``lora_B``; other tensors as is."""
    out = {}
    for name, value in params.items():
        if ".lora_A." in name:
            out[name] = value[:rank].clone()
        elif ".lora_B." in name:
            out[name] = value[:, :rank].clone()
        else:
            out[name] = value.clone()
    return out


def pad(params: Params, rank: int) -> Params:
    """Zero-pad every ``lora_A`` to ``rank`` rows and ``lora_B`` to ``rank`` columns."""
    out = {}
    for name, value in params.items():
        if ".lora_A." in name:
            out[name] = torch.cat([value, value.new_zeros(rank - value.shape[0], value.shape[1])], 0)
        elif ".lora_B." in name:
            out[name] = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1])], 1)
        else:
            out[name] = value
    return out


def tail_norm(params: Params, modules: tuple[str, ...], q: int) -> Tensor:
    """``sum_modules ||B[:, q:]||_F ||A[q:, :]||_F`` (differentiable)."""
    total = params[f"{modules[0]}.lora_A.{COMMON}.weight"].new_zeros(())
    for m in modules:
        a, b = params[f"{m}.lora_A.{COMMON}.weight"], params[f"{m}.lora_B.{COMMON}.weight"]
        total = total + torch.linalg.norm(b[:, q:]) * torch.linalg.norm(a[q:, :])
    return total


def update_norm(params: Params, layout: AdapterLayout) -> float:
    """``||dW_k||_F`` over all modules: the norm of the concatenation of every ``B_k A_k``."""
    total = 0.0
    for m in layout.modules:
        a, b = params[f"{m}.lora_A.{COMMON}.weight"], params[f"{m}.lora_B.{COMMON}.weight"]
        total += float(torch.linalg.norm(b.double() @ a.double()) ** 2)
    return math.sqrt(total)


class RankedServer(ServerAlgorithm):
    """A global adapter of rank r_max; each client gets its own leading rank of it (HETLoRA, FlexLoRA)."""

    def __init__(
        self,
        initial: Params,
        layout: AdapterLayout,
        ranks: list[int],
        client_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self._params = clone_params(initial)
        self.layout = layout
        self.r_max = layout.rank
        self.ranks = dict(enumerate(ranks))
        self.client_fraction, self.seed = client_fraction, seed

    @property
    def global_params(self) -> Params:
        return self._params

    def state(self) -> dict[str, Any]:
        return {"params": self._params, "ranks": dict(self.ranks)}

    def load_state(self, state: dict[str, Any]) -> None:
        self._params, self.ranks = clone_params(state["params"]), dict(state["ranks"])

    def _instruction(self, cid: int, server_round: int) -> Instruction:
        rank = self.ranks[cid]
        return Instruction(truncate(self._params, rank), {"server_round": server_round, "rank": rank})

    def configure_train(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        chosen = sample_clients(client_ids, self.client_fraction, self.seed, "clients", server_round)
        return {cid: self._instruction(cid, server_round) for cid in chosen}

    def configure_evaluate(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        return {cid: self._instruction(cid, server_round) for cid in client_ids}


class HetLoRAServer(RankedServer):
    """Sparsity-weighted averaging of the zero-padded replies; clients' pruned ranks kept."""

    def check_reply(self, instruction: Instruction, reply: TrainResult) -> str | None:
        """A client may prune its rank: the reply is what it was sent, cut to the rank it reports
        (between ``r_min``, as far as the client was sent that much, and the rank it was sent)."""
        sent, rank = int(instruction.config["rank"]), reply.metrics.get("rank")
        if rank is None or rank != int(rank) or not 1 <= rank <= sent:
            return f"reported rank {rank} is not between 1 and the rank it was sent ({sent})"
        return structure_problem(truncate(instruction.params, int(rank)), reply.params)

    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None:
        if not results:
            return
        cids = sorted(results)
        for cid in cids:
            self.ranks[cid] = int(results[cid].metrics["rank"])
        padded = [pad(results[c].params, self.r_max) for c in cids]
        norms = [update_norm(results[c].params, self.layout) for c in cids]
        weights = norms if sum(norms) > 0 else [1.0] * len(cids)
        lora = {k for k in padded[0] if ".lora_" in k}
        merged = weighted_average([{k: p[k] for k in lora} for p in padded], weights)
        heads = weighted_average([{k: p[k] for k in p if k not in lora} for p in padded], [1.0] * len(cids))
        self._params = {**merged, **heads}


class HetLoRAClient(LoRAClient):
    """Local AdamW with the self-pruning penalty, then the pruning rule."""

    def __init__(self, model: AdapterModel, train: TrainConfig, het: HetLoRAConfig, seed: int = 0) -> None:
        super().__init__(model, train, seed)
        self.het = het

    def begin_round(self, instruction: Instruction, x: dict[str, Tensor], state: ClientState) -> ClientState:
        rank = int(instruction.config["rank"])
        if state.get("rank") not in (None, rank):
            state["optimizer"] = None  # moments of another shape: start afresh
        state["rank"] = rank
        q = math.ceil(self.het.gamma * rank)
        with torch.no_grad():  # this round's q and tail norm at receipt, dropped in end_round
            state["round"] = {"q": q, "tail_at_receipt": float(tail_norm(x, self.model.layout.modules, q))}
        return state

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        loss = self.model.loss(x, self.next_batch(client_id, state, data, self.cfg.batch_size))
        (loss + self.het.penalty * tail_norm(x, self.model.layout.modules, state["round"]["q"])).backward()
        return loss.item()

    def end_round(
        self, instruction: Instruction, x: dict[str, Tensor], state: ClientState
    ) -> tuple[Params, dict[str, float]]:
        """The pruning rule: if the tail norm fell during the round, ``r_k <- max(r_min, q)``."""
        rank, round_ = state["rank"], state.pop("round")
        with torch.no_grad():
            tail_after = float(tail_norm(x, self.model.layout.modules, round_["q"]))
        pruned = tail_after < round_["tail_at_receipt"]
        new_rank = min(rank, max(self.het.r_min, round_["q"])) if pruned else rank
        return truncate(clone_params(x), new_rank), {"rank": new_rank, "tail_norm": tail_after}


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[HetLoRAServer, HetLoRAClient, TwoLevelModel]:
    """The adapter at r_max; each client trains its own leading r_k components of it."""
    lo, het, t = cfg.lora, cfg.hetlora, cfg.train
    scaling = lo.lora_alpha / lo.rank  # every client's scaling, whatever its rank
    model = lora_model(cfg, base, task, rank=het.r_max, lora_alpha=scaling * het.r_max, head="shared")
    ranks = initial_ranks(cfg.data.num_clients, het.r_min, het.r_max, het.ranks)
    server = HetLoRAServer(model.initial_common(), model.layout, ranks, t.client_fraction, cfg.seed)
    return server, HetLoRAClient(model, t, het, cfg.seed), model
