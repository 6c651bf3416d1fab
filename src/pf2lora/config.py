"""Typed, validated experiment configuration: YAML files plus dotted ``key=value`` overrides.

Every field is a dataclass field with a one-line help text. ``validate()`` checks everything that
can be checked without data or a model; anything wrong raises :class:`ConfigError`, whose message
is a single line the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HESSIANS = ("first_order", "exact", "finite_difference")
PFEDLORA_OBJECTIVES = ("separate", "combined")
HYPERGRADIENTS = ("exact", "finite_difference", "first_order", "joint")
PER_METHOD_SECTIONS = ("lora", "train", "hetlora", "perfedavg", "pfedlora", "flexlora", "feddpa")
ENGINES = ("local", "flower")
PARTITIONS = ("heterogeneity", "key", "dirichlet", "iid", "classes")
TASKS = ("classification", "qa", "generation")  # one module each under pf2lora/tasks/
TRACKERS = ("tensorboard", "mlflow", "wandb")  # pf2lora/trackers.py; each an optional extra
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # model.dtype: pf2lora/precision.py


class ConfigError(ValueError):
    """A user error in the configuration or the inputs it names (exit status 2)."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# the kinds of bad update flower.fail can inject (pf2lora.algorithms.validation.spoil makes them)
SPOILS = ("nan", "inf", "shape", "missing", "personal", "dtype", "far")


@dataclass
class TaskConfig:
    name: str = _help(
        "classification | qa (extractive QA) | generation (data-to-text with a causal LM); the model, loss and "
        "metrics come from pf2lora/tasks/<name>.py",
        "classification",
    )
    version: int = _help("qa: SQuAD version, 1 (every question answerable) or 2 (no-answer allowed)", 1)
    stride: int | None = _help(
        "qa: tokens shared by consecutive windows over a long context (< model.max_length; None: a quarter of it)",
        None,
    )
    n_best: int = _help("qa: best starts and best ends per window considered when decoding a span", 20)
    max_answer_length: int = _help("qa: longest answer span in tokens", 30)
    null_threshold: float = _help("qa v2: answer empty when no-answer score - best span score > this", 0.0)
    num_beams: int = _help("generation: beam width of the beam search (the paper: 10)", 10)
    max_new_tokens: int = _help("generation: most tokens generated per input", 64)
    length_penalty: float = _help("generation: beam search's length penalty (LoRA's E2E decoding: 0.9)", 0.9)
    no_repeat_ngram_size: int = _help("generation: no n-gram of this size twice in an output (0: off)", 4)
    eval_tokens: int = _help(
        "qa, generation: most tokens in one evaluation batch (inputs sorted by length; a beam search counts every "
        "beam, its prompt and max_new_tokens); train.eval_batch_size still caps QA windows and loss batches",
        32768,
    )


@dataclass
class ModelConfig:
    name: str = _help("'bundled' (all-MiniLM-L6-v2, offline), a Hub model id or a local path", "bundled")
    max_length: int = _help("maximum tokens per example (longer inputs are truncated)", 64)
    dropout: float | None = _help("override the model's hidden/attention dropout; None keeps it", None)
    device: str = _help("auto (a GPU when there is one) | cpu | cuda | cuda:N", "auto")
    dtype: str = _help(
        "the frozen base's linear layers: float32 | bfloat16 | float16 | auto (bfloat16 where the CPU or GPU "
        "computes it natively, else float32); adapters, head, losses and optimizer states stay float32",
        "float32",
    )


@dataclass
class DataConfig:
    dataset: str = _help(
        "rotten_tomatoes | bbc_news (bundled), a GLUE task (sst2, cola, mnli, qqp, qnli), "
        "hf:<path>[:<config>] for any Hub dataset, or 'file' with data.path; task qa: squad | squad_v2 "
        "(from data.path when given) or 'file' (a SQuAD JSON)",
        "rotten_tomatoes",
    )
    path: str | None = _help("CSV / JSON lines / Parquet file when dataset=file", None)
    test_path: str | None = _help("optional separate test file when dataset=file", None)
    text_column: str | None = _help("text column (default: the dataset's own)", None)
    text_pair_column: str | None = _help("second text column for sentence-pair tasks", None)
    label_column: str | None = _help("label column (default: the dataset's own)", None)
    target_column: str | None = _help("generation, dataset=file: the target text column (default: target)", None)
    key_column: str | None = _help("column for partition=key (default: the dataset's own)", None)
    test_fraction: float = _help("held-out fraction when the data has no test split", 0.2)
    validation_fraction: float = _help(
        "fraction of each client's training data held out as its validation split (seeded, after the partition, "
        "so it follows the client's own distribution; 0: none). Runs then report validation metrics (val_<metric>) "
        "beside the test metrics; pf2lora tune chooses hyperparameters on them",
        0.0,
    )
    evaluate_test: bool = _help(
        "evaluate on the test split (false: on the validation split only, as pf2lora tune's trials do; the test "
        "split is then never encoded nor evaluated)",
        True,
    )
    max_examples: int | None = _help("seeded subsample of the training split (None: all)", None)
    max_test_examples: int | None = _help("seeded subsample of the test split (None: all)", None)
    num_clients: int = _help("number of federated clients M", 8)
    partition: str = _help("heterogeneity | key | dirichlet | iid | classes", "heterogeneity")
    heterogeneity: float = _help("h in [0, 1]: label-sorted fraction of each client's data", 0.9)
    dirichlet_alpha: float = _help("concentration of the Dirichlet label skew", 0.5)
    classes_per_client: int = _help("labels per client for partition=classes (pathological non-IID)", 2)


@dataclass
class LoRAConfig:
    target_modules: list[str] = _help(
        "names of the linear layers that get adapters; [auto]: PEFT's defaults for the model type",
        factory=lambda: ["query", "value"],
    )
    rank: int = _help("rank r of the common adapter {A, B}", 8)
    personal_rank: int = _help("rank r~ < r of the personal adapter {C_k, D_k}", 2)
    lora_alpha: float = _help("common scaling s = lora_alpha / rank", 16.0)
    personal_lora_alpha: float = _help("personal scaling s~ = personal_lora_alpha / r~", 4.0)
    head: str = _help("task head in the common adapter (shared) or in each client's (personal)", "shared")


@dataclass
class HetLoRAConfig:
    r_min: int = _help("smallest rank a client may have (pruning floor)", 8)
    r_max: int = _help("rank of the server's global adapter", 12)
    ranks: list[int] | None = _help("explicit initial rank per client (default: the r_min..r_max formula)", None)
    gamma: float = _help("sparsity factor: the tail starts at q = ceil(gamma r_k)", 0.99)
    penalty: float = _help("lambda of the self-pruning term sum ||B[:, q:]||_F ||A[q:, :]||_F", 5e-3)


@dataclass
class FlexLoRAConfig:
    r_min: int = _help("smallest client rank", 4)
    r_max: int = _help("largest client rank (the server keeps this many SVD components)", 12)
    ranks: list[int] | None = _help("explicit rank per client (default: the r_min..r_max formula, as HETLoRA's)", None)


@dataclass
class FedDPAConfig:
    local_weight: float = _help(
        "lambda: the local adapter's weight while it trains (and at test time when weighting=fixed)", 0.5
    )
    weighting: str = _help(
        "instance: the weight of each test instance from its similarity to the client's data | fixed", "instance"
    )
    max_weight: float = _help("the largest instance weight: a(x) = max_weight * mean cosine similarity", 0.5)
    instances: int = _help("how many of the client's training examples the similarity is measured against", 5)

    def validate(self) -> None:
        for key in ("local_weight", "max_weight"):
            value = getattr(self, key)
            _check(0.0 <= value <= 1.0, f"feddpa.{key} must be in [0, 1], got {value}")
        _check(
            self.weighting in ("instance", "fixed"),
            f"feddpa.weighting must be instance or fixed, got {self.weighting!r}",
        )
        _check(self.instances >= 1, f"feddpa.instances must be >= 1, got {self.instances}")


@dataclass
class PerFedAvgConfig:
    alpha: float = _help("Per-FedAvg's one-step SGD learning rate (inner step and personalisation)", 1e-2)
    hessian: str = _help(
        "first_order | exact | finite_difference: the Hessian-vector term of the meta-gradient", "first_order"
    )


@dataclass
class PFedLoRAConfig:
    models: list[str] = _help(
        "local architectures dealt round-robin (client k gets models[k mod len]): cnn1..cnn5, encoder-N "
        "(the model.name encoder cut to N layers) or module.path:factory",
        factory=lambda: ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"],
    )
    fedavg_model: str = _help("the one architecture every client has in the fedavg baseline", "cnn1")
    rep_dim: int = _help("d, the representation every local model ends in (the adapter's input)", 500)
    adapter_rank: int = _help("rank r of the adapter B A (A: r x d, B: classes x r)", 8)
    mu: float = _help("balance: (1 - mu) CE(head) + mu CE(adapter) in training and in prediction", 0.5)
    adapter_lr: float = _help("AdamW learning rate of the adapter phase", 1e-3)
    adapter_steps: int | None = _help("adapter steps per round (None: train.local_steps)", None)
    objective: str = _help(
        "separate: (1 - mu) CE(head) + mu CE(adapter) for the local model, CE(adapter) for the adapter "
        "(the default reading); combined: both phases minimise CE of the prediction (1 - mu) head + mu adapter, as a "
        "LoRA branch is trained on the sum of its output and the frozen layer's",
        "separate",
    )


@dataclass
class TrainConfig:
    rounds: int = _help("communication rounds R (0: only evaluate the untrained model)", 10)
    local_steps: int = _help("local steps I between two averagings", 10)
    batch_size: int = _help("minibatch size per step (each of pi and xi)", 16)
    lr: float = _help("upper-level (common adapter) AdamW learning rate eta", 1e-3)
    lower_lr: float = _help(
        "lower-level (personal adapter) SGD learning rate alpha (0.1, measured: the paper's 1e-3 leaves a "
        "zero-initialised personal adapter where it started, 1.0 lets it take over; docs/design.md section 7)",
        0.1,
    )
    weight_decay: float = _help("AdamW weight decay", 0.01)
    hypergradient: str = _help("exact | finite_difference | first_order | joint", "finite_difference")
    fd_epsilon: float | None = _help(
        "finite-difference step, as the norm of the perturbation of y; None: by model.dtype, 1e-3 with a float32 "
        "base, 1e-2 x ||y|| (at least 1e-2) with bfloat16, 3e-3 x ||y|| with float16 (a smaller step drowns in "
        "the low dtype's rounding)",
        None,
    )
    independent_mixed_batch: bool = _help("draw the mixed-derivative batch zeta apart from pi", False)
    reset_optimizer: bool = _help("reset each client's AdamW state every round", False)
    aggregation: str = _help("uniform (1/M, as the paper) | weighted (by training examples)", "uniform")
    client_fraction: float = _help("fraction of clients sampled each round", 1.0)
    eval_every: int = _help("evaluate every N rounds (0: only after the last round)", 0)
    eval_batch_size: int = _help("batch size for evaluation", 64)
    threads: int | None = _help(
        "torch CPU threads per worker process (None: the cores shared between the workers; torch's "
        "default where clients train in this process)",
        None,
    )
    workers: int | None = _help(
        "local engine: processes that train a round's clients side by side, sharing the frozen base "
        "model (None: the machine's cores / threads, at most a round's clients, and one process on "
        "one core or a CUDA device; 1: one after another in this process)",
        None,
    )
    update_norm_bound: float | None = _help(
        "the server rejects a client's update whose L2 norm (its reply minus what it was sent, over every "
        "tensor) exceeds this (None: no bound; malformed and non-finite updates are always rejected)",
        None,
    )
    client_state: str = _help("memory | disk: where the engine keeps clients' personal state", "memory")
    compression: str = _help("none | fp16 | bf16: the dtype of the adapters that travel", "none")


@dataclass
class FlowerConfig:
    min_replies: int | None = _help(
        "least number of a round's sampled clients whose update must arrive and pass the server's checks "
        "for the round to go on (None: all on Flower; at least one on the local engine)",
        None,
    )
    timeout: float = _help("seconds the server waits for a round's replies", 3600.0)
    connect_timeout: float = _help("seconds the server waits for every client's SuperNode to connect", 300.0)
    client_cpus: float = _help("CPUs per simulated client (simulation runtime; clients run side by side)", 1.0)
    secure_aggregation: bool = _help(
        "Flower's SecAgg+: the server sees only the mean of a round's client updates, never one (methods "
        "whose server averages, train.aggregation=uniform, no dp)",
        False,
    )
    fail: list[str] = _help(
        "fault injection: 'K@R' makes client K raise in training round R, 'K@R:KIND' makes it send a bad "
        "update instead (KIND: nan, inf, shape, missing, personal, dtype, far), to exercise the failure "
        "path and the server's checks",
        factory=list,
    )


@dataclass
class DPConfig:
    enabled: bool = _help(
        "client-level differential privacy (DP-FedAvg): each client's update clipped, Gaussian noise added to "
        "their sum, clients sampled independently with probability train.client_fraction",
        False,
    )
    clip: float = _help("C: the largest L2 norm of one client's update of what it sends back", 1.0)
    noise_multiplier: float = _help("sigma: the noise's standard deviation over C (0: clipping only, no privacy)", 1.0)
    delta: float = _help("the delta at which the privacy spent (epsilon) is reported", 1e-5)
    noise_seed: int | None = _help(
        "seed the noise and the sampling (reproducible experiments only: whoever knows it can remove the noise); "
        "None: the operating system's secure randomness",
        None,
    )

    def validate(self) -> None:
        if not self.enabled:
            return
        _check(self.clip > 0, f"dp.clip must be > 0, got {self.clip}")
        _check(self.noise_multiplier >= 0, f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _check(0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}")


@dataclass
class ExperimentConfig:
    name: str = _help("experiment name (used in the run directory name)", "experiment")
    seed: int = _help("seed for data, initialisation and sampling", 0)
    algorithms: list[str] = _help("methods to run, in order", factory=lambda: ["pf2lora", "homlora"])
    engine: str = _help("local (in-process) | flower (Flower's simulation runtime; see the README)", "local")
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hetlora: HetLoRAConfig = field(default_factory=HetLoRAConfig)
    perfedavg: PerFedAvgConfig = field(default_factory=PerFedAvgConfig)
    pfedlora: PFedLoRAConfig = field(default_factory=PFedLoRAConfig)
    flexlora: FlexLoRAConfig = field(default_factory=FlexLoRAConfig)
    feddpa: FedDPAConfig = field(default_factory=FedDPAConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    report_to: list[str] = _help(
        "experiment trackers that follow every round: tensorboard, mlflow, wandb (each an optional extra: "
        "pip install 'pf2lora[NAME]'); none by default",
        factory=list,
    )
    per_method: dict[str, Any] = _help(
        "settings for one method only, e.g. {pf2lora: {train: {lr: 1e-3}}} (sections lora, train and the methods' "
        "own: hetlora, perfedavg, pfedlora, flexlora, feddpa): the paper tunes learning rates per method (its Table 6)",
        factory=dict,
    )

    def for_method(self, name: str) -> ExperimentConfig:
        """This config with ``per_method[name]`` merged in (the data, model and seed stay shared)."""
        extra = self.per_method.get(name)
        if not extra:
            return self
        merged = _merge(self.to_dict(), extra)
        merged["per_method"] = {}
        return from_dict(ExperimentConfig, merged).validate()

    def validate(self) -> ExperimentConfig:
        """Check every value that can be checked before loading data or a model."""
        _check(bool(self.algorithms), "algorithms: give at least one method")
        for tracker in self.report_to:
            _check(tracker in TRACKERS, f"unknown report_to {tracker!r} (choose from {', '.join(TRACKERS)})")
        _check(self.engine in ENGINES, f"unknown engine {self.engine!r} (choose from {', '.join(ENGINES)})")
        fl = self.flower
        _check(fl.min_replies is None or fl.min_replies >= 1, f"flower.min_replies must be >= 1, got {fl.min_replies}")
        for key in ("timeout", "connect_timeout", "client_cpus"):
            _check(getattr(fl, key) > 0, f"flower.{key} must be > 0, got {getattr(fl, key)}")
        for item in fl.fail:
            _check(
                re.fullmatch(rf"\d+@\d+(:({'|'.join(SPOILS)}))?", str(item)) is not None,
                f"flower.fail: {item!r} is not CLIENT@ROUND or CLIENT@ROUND:KIND (e.g. 1@2, 1@2:nan; "
                f"KIND: {', '.join(SPOILS)})",
            )
        tk = self.task
        _check(tk.name in TASKS, f"unknown task.name {tk.name!r} (choose from {', '.join(TASKS)})")
        _check(tk.version in (1, 2), f"task.version must be 1 or 2, got {tk.version}")
        _check(tk.stride is None or tk.stride >= 0, f"task.stride must be >= 0, got {tk.stride}")
        _check(
            tk.name != "qa" or tk.stride is None or tk.stride < self.model.max_length,
            f"task.stride ({tk.stride}) must be smaller than model.max_length ({self.model.max_length})",
        )
        for key in ("n_best", "max_answer_length", "num_beams", "max_new_tokens", "eval_tokens"):
            _check(getattr(tk, key) >= 1, f"task.{key} must be >= 1, got {getattr(tk, key)}")
        _check(tk.length_penalty > 0, f"task.length_penalty must be > 0, got {tk.length_penalty}")
        _check(tk.no_repeat_ngram_size >= 0, f"task.no_repeat_ngram_size must be >= 0, got {tk.no_repeat_ngram_size}")
        m, d, lo, t = self.model, self.data, self.lora, self.train
        _check(m.max_length >= 8, f"model.max_length must be >= 8, got {m.max_length}")
        _check(
            m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:"),
            f"model.device must be auto, cpu, cuda or cuda:N, got {m.device!r}",
        )
        _check(
            m.dtype in MODEL_DTYPES,
            f"model.dtype must be {', '.join(MODEL_DTYPES[:-1])} or {MODEL_DTYPES[-1]}, got {m.dtype!r}",
        )
        _check(m.dropout is None or 0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
        _check(d.num_clients >= 1, f"data.num_clients must be >= 1, got {d.num_clients}")
        _check(
            d.partition in PARTITIONS, f"unknown data.partition {d.partition!r} (choose from {', '.join(PARTITIONS)})"
        )
        _check(0.0 <= d.heterogeneity <= 1.0, f"data.heterogeneity must be in [0, 1], got {d.heterogeneity}")
        _check(d.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0, got {d.dirichlet_alpha}")
        _check(d.classes_per_client >= 1, f"data.classes_per_client must be >= 1, got {d.classes_per_client}")
        _check(0.0 < d.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
        _check(
            0.0 <= d.validation_fraction < 1.0,
            f"data.validation_fraction must be in [0, 1), got {d.validation_fraction}",
        )
        _check(
            d.evaluate_test or d.validation_fraction > 0,
            "data.evaluate_test=false evaluates on the validation split only: set data.validation_fraction > 0",
        )
        for key in ("max_examples", "max_test_examples"):
            value = getattr(d, key)
            _check(value is None or value >= 1, f"data.{key} must be >= 1, got {value}")
        _check(d.dataset != "file" or bool(d.path), "data.dataset=file needs data.path")
        _check(bool(lo.target_modules), "lora.target_modules: give at least one module name")
        _check(lo.rank > 0, f"lora.rank must be > 0, got {lo.rank}")
        _check(lo.personal_rank > 0, f"lora.personal_rank must be > 0, got {lo.personal_rank}")
        _check(
            lo.personal_rank < lo.rank,
            f"lora.personal_rank ({lo.personal_rank}) must be smaller than lora.rank ({lo.rank})",
        )
        _check(lo.lora_alpha > 0 and lo.personal_lora_alpha > 0, "lora alphas must be > 0")
        _check(lo.head in ("shared", "personal"), f"lora.head must be shared or personal, got {lo.head!r}")
        _check(t.rounds >= 0, f"train.rounds must be >= 0 (0: evaluate the untrained model), got {t.rounds}")
        for key in ("local_steps", "batch_size", "eval_batch_size"):
            _check(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
        for key in ("lr", "lower_lr"):
            _check(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
        _check(t.fd_epsilon is None or t.fd_epsilon > 0, f"train.fd_epsilon must be > 0, got {t.fd_epsilon}")
        _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
        _check(
            t.hypergradient in HYPERGRADIENTS,
            f"unknown train.hypergradient {t.hypergradient!r} (choose from {', '.join(HYPERGRADIENTS)})",
        )
        _check(
            t.aggregation in ("uniform", "weighted"),
            f"train.aggregation must be uniform or weighted, got {t.aggregation!r}",
        )
        _check(0 < t.client_fraction <= 1, f"train.client_fraction must be in (0, 1], got {t.client_fraction}")
        _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
        _check(t.threads is None or t.threads >= 1, f"train.threads must be >= 1, got {t.threads}")
        _check(t.workers is None or t.workers >= 1, f"train.workers must be >= 1, got {t.workers}")
        _check(
            t.update_norm_bound is None or t.update_norm_bound > 0,
            f"train.update_norm_bound must be > 0, got {t.update_norm_bound}",
        )
        _check(
            t.compression in ("none", "fp16", "bf16"),
            f"train.compression must be none, fp16 or bf16, got {t.compression!r}",
        )
        _check(
            t.client_state in ("memory", "disk"), f"train.client_state must be memory or disk, got {t.client_state!r}"
        )
        self.dp.validate()
        if fl.secure_aggregation:
            _check(self.engine == "flower", "flower.secure_aggregation runs on a Flower federation (engine=flower)")
            _check(t.aggregation == "uniform", "flower.secure_aggregation needs train.aggregation=uniform")
            per_round = (
                d.num_clients if t.client_fraction >= 1 else max(1, math.ceil(t.client_fraction * d.num_clients))
            )
            _check(
                per_round >= 2,
                f"flower.secure_aggregation needs at least 2 clients per round (SecAgg+ hides one update among "
                f"others), got {per_round}",
            )
            _check(
                not self.dp.enabled,
                "flower.secure_aggregation and dp.enabled together: the server cannot clip an update it never sees "
                "(clients clipping their own and the server adding noise to the secure sum is not built)",
            )
            _check(
                t.update_norm_bound is None,
                "flower.secure_aggregation hides each update from the server: it cannot hold one to "
                "train.update_norm_bound",
            )
        _check(
            not self.dp.enabled or t.aggregation == "uniform",
            "dp.enabled needs train.aggregation=uniform (DP-FedAvg divides the clipped updates' noisy sum by the "
            "expected number of clients)",
        )
        pf = self.pfedlora
        _check(bool(pf.models), "pfedlora.models: give at least one architecture")
        for key in ("rep_dim", "adapter_rank"):
            _check(getattr(pf, key) >= 1, f"pfedlora.{key} must be >= 1, got {getattr(pf, key)}")
        _check(0 <= pf.mu <= 1, f"pfedlora.mu must be in [0, 1], got {pf.mu}")
        _check(pf.adapter_lr > 0, f"pfedlora.adapter_lr must be > 0, got {pf.adapter_lr}")
        _check(
            pf.objective in PFEDLORA_OBJECTIVES,
            f"unknown pfedlora.objective {pf.objective!r} (choose from {', '.join(PFEDLORA_OBJECTIVES)})",
        )
        _check(
            pf.adapter_steps is None or pf.adapter_steps >= 1,
            f"pfedlora.adapter_steps must be >= 1, got {pf.adapter_steps}",
        )
        per = self.perfedavg
        _check(per.alpha > 0, f"perfedavg.alpha must be > 0, got {per.alpha}")
        _check(
            per.hessian in HESSIANS,
            f"unknown perfedavg.hessian {per.hessian!r} (choose from {', '.join(HESSIANS)})",
        )
        for method, extra in self.per_method.items():
            _check(isinstance(extra, dict), f"per_method.{method}: expected a mapping of sections")
            bad = sorted(set(extra) - set(PER_METHOD_SECTIONS))
            _check(
                not bad,
                f"per_method.{method}: {', '.join(bad)} cannot differ between methods "
                f"(allowed: {', '.join(PER_METHOD_SECTIONS)})",
            )
        if self.per_method:
            for method in self.per_method:
                self.for_method(method)  # every merged config must be valid too
        _check_ranks("flexlora", self.flexlora.r_min, self.flexlora.r_max, self.flexlora.ranks, d.num_clients)
        self.feddpa.validate()
        het = self.hetlora
        _check_ranks("hetlora", het.r_min, het.r_max, het.ranks, d.num_clients)
        _check(0 < het.gamma <= 1, f"hetlora.gamma must be in (0, 1], got {het.gamma}")
        _check(het.penalty >= 0, f"hetlora.penalty must be >= 0, got {het.penalty}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_ranks(section: str, r_min: int, r_max: int, ranks: list[int] | None, num_clients: int) -> None:
    _check(r_min >= 1, f"{section}.r_min must be >= 1, got {r_min}")
    _check(r_min <= r_max, f"{section}.r_min ({r_min}) must not exceed {section}.r_max ({r_max})")
    if ranks is not None:
        _check(len(ranks) == num_clients, f"{section}.ranks has {len(ranks)} entries for {num_clients} clients")
        bad = [r for r in ranks if not r_min <= r <= r_max]
        _check(not bad, f"{section}.ranks {bad} outside [r_min, r_max] = [{r_min}, {r_max}]")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- building from data


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, type-checking every value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, where + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """Map every leaf field name to its dotted paths (used to resolve short override keys)."""
    paths: dict[str, list[str]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for name, found in _leaf_paths(hints[f.name], f"{prefix}{f.name}.").items():
                paths.setdefault(name, []).extend(found)
        else:
            paths.setdefault(f.name, []).append(f"{prefix}{f.name}")
    return paths


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key=value`` (value parsed as YAML) to the nested dict ``data`` in place.

    Keys are dotted paths (``train.rounds=5``); a bare name that is a unique leaf field
    (``rounds=5``) is resolved to its path, and ``algorithm=NAME`` means ``algorithms=[NAME]``.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if key == "algorithm":
        key, value = "algorithms", [value] if isinstance(value, str) else value
    top = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if "." not in key and key not in top:
        leaves = _leaf_paths(ExperimentConfig)
        if key not in leaves:
            raise ConfigError(f"unknown config key {key!r}")
        if len(leaves[key]) > 1:
            raise ConfigError(f"config key {key!r} is ambiguous ({' or '.join(leaves[key])}): use the dotted path")
        key = leaves[key][0]
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: ExperimentConfig | None = None
) -> ExperimentConfig:
    """Read a YAML config (or start from ``base``, or the defaults), apply overrides, type-check and
    validate."""
    data: dict[str, Any] = base.to_dict() if base is not None else {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return from_dict(ExperimentConfig, data).validate()


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to write over an earlier run unless asked to, and a directory that cannot be made or
    written (its nearest existing folder is a file, or not writable), before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} already holds files; choose a new directory or pass --force")
    nearest = out.absolute()
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"--out {out} cannot be made: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {nearest} is not writable")
