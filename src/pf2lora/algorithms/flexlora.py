"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): clients of different ranks, aggregated as full updates.

Client k trains a LoRA of its own rank r_k (``flexlora.ranks``, or ``r_min + floor((r_max - r_min)
(k - 1) / M)`` as HETLoRA's), every client with the same scaling s = ``lora_alpha / rank``. Each
round:

    (A_k, B_k) <- I local AdamW steps on F_k from what the server sent
    dW         <- sum_k w_k B_k A_k,  w_k = n_k / sum_j n_j        (full m x n products, per module)
    dW = U S V^T (SVD);  client k gets  B_k = U[:, :r_k] S[:r_k],  A_k = V^T[:r_k]

so that ``B_k A_k`` is the best rank-r_k approximation of the average of the clients' updates
(Eckart-Young), whatever the ranks: a client of small rank still learns from the large-rank
clients' updates, which averaging zero-padded factors (HETLoRA) distorts. The first round sends the
LoRA init (A Kaiming-uniform, B zero) truncated to each rank. The head is averaged with the same
weights. Client k evaluates the global update truncated to its own rank.

The server keeps the SVD factors at r_max (the leading components of the average, enough for every
client: the truncated SVD at r_k is the leading r_k of them). The new factors are a new basis
each round, so each client's AdamW moments start afresh every round.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pf2lora.adapters.two_level import COMMON, TwoLevelModel
from pf2lora.algorithms.base import TrainResult
from pf2lora.algorithms.hetlora import RankedServer, initial_ranks
from pf2lora.algorithms.homlora import HomLoRAClient
from pf2lora.algorithms.lora_client import lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task
from pf2lora.utils import average_product, weighted_average


def redistribute(update: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B A`` the best rank-``rank`` approximation of ``update`` (m x n):
    ``B = U[:, :rank] S[:rank]``, ``A = V^T[:rank]`` (zero-padded where the update's rank is smaller)."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    b[:, :k], a[:k] = u[:, :k] * s[:k], vh[:k]
    return b, a


class FlexLoRAServer(RankedServer):
    """The leading r_max SVD components of the averaged update; each client's rank of them."""

    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None:
        if not results:
            return
        replies = [results[cid] for cid in sorted(results)]
        weights = [float(r.num_examples) for r in replies]
        lora = {k for k in replies[0].params if ".lora_" in k}
        new = weighted_average([{k: v for k, v in r.params.items() if k not in lora} for r in replies], weights)
        for m in self.layout.modules:
            a, b = f"{m}.lora_A.{COMMON}.weight", f"{m}.lora_B.{COMMON}.weight"
            update = average_product([r.params for r in replies], weights, b, a)
            new_b, new_a = redistribute(update, self.r_max)
            new[b], new[a] = new_b.to(self._params[b].dtype), new_a.to(self._params[a].dtype)
        self._params = new


class FlexLoRAClient(HomLoRAClient):
    """Local AdamW on the factors of its own rank; fresh moments each round (a new basis)."""

    def begin_round(self, instruction, x, state):
        state["optimizer"] = None
        return state


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[FlexLoRAServer, FlexLoRAClient, TwoLevelModel]:
    lo, flex, t = cfg.lora, cfg.flexlora, cfg.train
    scaling = lo.lora_alpha / lo.rank  # every client's scaling, whatever its rank
    model = lora_model(cfg, base, task, rank=flex.r_max, lora_alpha=scaling * flex.r_max, head="shared")
    ranks = initial_ranks(cfg.data.num_clients, flex.r_min, flex.r_max, flex.ranks)
    server = FlexLoRAServer(model.initial_common(), model.layout, ranks, t.client_fraction, cfg.seed)
    return server, FlexLoRAClient(model, t, cfg.seed), model
