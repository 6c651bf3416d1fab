"""FedDPA (Yang et al., NeurIPS 2024, "Dual-Personalizing Adapter for Federated Foundation Models"):
a global adapter trained by FedAvg and a local adapter per client, mixed per test instance.

Client k holds a global adapter g = {A_g, B_g} (received) and a local one l_k = {A_l, B_l} of the
same rank r (its own, never sent). The model at mixing weight a is
``W0 + (1 - a) s B_g A_g + a s B_l A_l``. Each round (FedDPA-T, the iterative variant of the
authors' code):

    l_k <- I AdamW steps on F_k at a = lambda (``feddpa.local_weight``, 0.5), g fixed
    g_k <- I AdamW steps on F_k of the global adapter alone (a = 0)
    g   <- sum_k w_k g_k                                          (FedAvg; l_k stays here)

Test time (instance-wise dynamic weighting): for a test instance x,
``a(x) = max_weight * mean_j cos(h(x), h(x_j))``, clipped to [0, max_weight], with h the mean of
the last layer's hidden states of the model with the local adapter alone, and x_j
``feddpa.instances`` (5) of the client's own training examples: an instance like the client's
data leans on its local adapter, an unfamiliar one on the global adapter.

Decisions, where the authors' code differs or is silent: the reference examples are drawn once
per evaluation with the run's seed (the code draws 5 fresh unseeded ones per test instance: the
same expectation, without the noise and the 5 extra passes per instance); h is the mean over the
input's tokens (the code's ``avg`` option; its default takes the last token of left-padded
prompts); a negative similarity gives weight 0. A step trains 2 I passes a round, twice HOMLoRA's.
``feddpa.weighting: fixed`` evaluates at a = lambda (the ablation without the dynamic weight).
The head (``lora.head: shared``) is part of the global adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pf2lora.adapters.two_level import COMMON, PERSONAL, ModelAt, TwoLevelModel
from pf2lora.algorithms.base import ClientData, ClientState, Instruction, Params
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import LoRAClient
from pf2lora.config import ExperimentConfig, FedDPAConfig, TrainConfig
from pf2lora.tasks.base import Task
from pf2lora.utils import generator


def mixed(params: Params, local_weight: float | Tensor) -> Params:
    """``params`` with every global B scaled by ``1 - a`` and every local B by ``a``: the model at
    mixing weight ``a`` (differentiable in the tensors)."""
    out = {}
    for name, value in params.items():
        if f".lora_B.{COMMON}." in name:
            out[name] = (1 - local_weight) * value
        elif f".lora_B.{PERSONAL}." in name:
            out[name] = local_weight * value
        else:
            out[name] = value
    return out


def instance_weights(h: Tensor, reference: Tensor, max_weight: float) -> Tensor:
    """``a(x_i) = max_weight * mean_j cos(h_i, ref_j)`` clipped to [0, max_weight]; returns the
    (n, 2) level weights ``[1 - a, a]``."""
    sim = F.cosine_similarity(h.unsqueeze(1), reference.unsqueeze(0), dim=-1).mean(1)
    a = (max_weight * sim).clamp(0.0, max_weight)
    return torch.stack([1 - a, a], dim=1)


class FedDPAServer(FedAvgServer):
    """FedAvg of the global adapter (and the head); it never sees a local adapter."""


class FedDPAClient(LoRAClient):
    """The local adapter's steps, then the global adapter's; instance-wise mixing at test time."""

    model: TwoLevelModel

    def __init__(self, model: TwoLevelModel, train: TrainConfig, dpa: FedDPAConfig, seed: int = 0) -> None:
        super().__init__(model, train, seed)
        self.dpa = dpa

    def init_state(self, client_id: int) -> ClientState:
        state = super().init_state(client_id)
        state["personal"] = self.model.initial_personal(generator(self.seed, "personal", client_id))
        state["local_optimizer"] = None
        return state

    def train(self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData):
        """The local adapter's I steps at weight lambda (the global adapter as received, fixed), then
        the global adapter's I steps (the base loop)."""
        self.seed_round(client_id, instruction)
        self.model.train(True)
        state = dict(state)
        fixed = {k: v.detach() for k, v in instruction.params.items()}
        y = self.leaves(state["personal"])
        opt = self.optimizer(y, {"optimizer": state.get("local_optimizer")})  # the local adapter's own moments
        for _ in range(self.cfg.local_steps):
            batch = self.next_batch(client_id, state, data, self.cfg.batch_size)
            self.model.loss(mixed({**fixed, **y}, self.dpa.local_weight), batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state["personal"] = {k: v.detach().clone() for k, v in y.items()}
        state["local_optimizer"] = opt.state_dict()
        return super().train(client_id, instruction, state, data)

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        """A step of the global adapter alone (weight 0 on the local one)."""
        loss = self.model.loss(
            mixed({**x, **state["personal"]}, 0.0), self.next_batch(client_id, state, data, self.cfg.batch_size)
        )
        loss.backward()
        return loss.item()

    # ------------------------------------------------------------------ test time
    def personalize(
        self, client_id: int, instruction: Instruction, state: ClientState, train_data: ClientData | None
    ) -> Instruction:
        """The instruction with the reference representations of ``feddpa.instances`` of this
        client's training examples (the local adapter's view of them)."""
        if self.dpa.weighting != "instance" or train_data is None or len(train_data) == 0:
            return instruction
        count = min(self.dpa.instances, len(train_data))
        order = torch.randperm(len(train_data), generator=generator(self.seed, "feddpa", client_id))[:count]
        with torch.no_grad():
            self.model.train(False)
            batch = train_data.batch(sorted(order.tolist()), self.model.device)
            reference = self.model.representation(self._local_only({**instruction.params, **state["personal"]}), batch)
        return Instruction(instruction.params, {**instruction.config, "reference": reference})

    @staticmethod
    def _local_only(params: Params) -> Params:
        return mixed(params, 1.0)

    @torch.no_grad()
    def evaluate(
        self,
        client_id: int,
        instruction: Instruction,
        state: ClientState,
        data: ClientData,
        record: Path | None = None,
    ) -> dict[str, float]:
        self.model.train(False)
        params = {**instruction.params, **state["personal"]}
        reference = instruction.config.get("reference") if self.dpa.weighting == "instance" else None
        if reference is None:  # weighting: fixed
            mix = mixed(params, self.dpa.local_weight)
            model = ModelAt(lambda batch: self.model.outputs(mix, batch), lambda **kw: self.model.generate(mix, **kw))
            return self.model.task.evaluate(model, data, self.cfg.eval_batch_size, self.model.device, record)
        local = self._local_only(params)

        def weights(batch) -> Tensor:
            return instance_weights(self.model.representation(local, batch), reference, self.dpa.max_weight)

        def forward(batch):
            with self.model.level_weights(weights(batch)):
                return self.model.outputs(params, batch)

        def generate(**kwargs):
            prompt = {k: kwargs[k] for k in ("input_ids", "attention_mask") if k in kwargs}
            with self.model.level_weights(weights(prompt)):
                return self.model.generate(params, **kwargs)

        return self.model.task.evaluate(
            ModelAt(forward, generate), data, self.cfg.eval_batch_size, self.model.device, record
        )

    def exported(self, instruction: Instruction, state: ClientState) -> Params:
        """A stock adapter cannot weight per instance: the export is the model at weight lambda."""
        return mixed({**instruction.params, **state["personal"]}, self.dpa.local_weight)


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[FedDPAServer, FedDPAClient, TwoLevelModel]:
    lo, t = cfg.lora, cfg.train
    # the local adapter has the global one's rank and scaling: a two-level model with r~ = r
    model = TwoLevelModel(
        base,
        task,
        lo.target_modules,
        rank=lo.rank,
        lora_alpha=lo.lora_alpha,
        personal_rank=lo.rank,
        personal_lora_alpha=lo.lora_alpha,
        head="shared",
        dtype=cfg.model.dtype,
    )
    return (
        FedDPAServer(model.initial_common(), t.aggregation, t.client_fraction, cfg.seed),
        FedDPAClient(model, t, cfg.feddpa, cfg.seed),
        model,
    )
