"""The method registry: every method pf2lora runs is one :class:`Method` here.

A method is a server part and a client part (:mod:`pf2lora.algorithms`) plus one entry: its name,
its family, a one-line description, the builder that makes its two parts, and what the runner
must know about it. The family says what the builder gets and how a run is prepared:

- ``lora``: a pretrained model with a two-level LoRA adapter (:mod:`pf2lora.families.lora`).
  ``build(cfg, base, task) -> (server, client, model)``, ``model`` the
  :class:`~pf2lora.adapters.two_level.TwoLevelModel` it wrapped ``base`` in. Runs on every task.
- ``heterogeneous``: each client its own model (:mod:`pf2lora.families.heterogeneous`).
  ``build(cfg, zoo, num_labels) -> (server, client)``, ``zoo`` the clients' models. Classifies.

Everything above this module (the runner, both engines, ``compare``, the CLI) looks methods up
here; nothing dispatches on a method's name. A user registers a method of their own with
:func:`register` (see the README's Python example) and runs it like a built-in one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pf2lora.algorithms import (
    centralized,
    feddpa,
    fedex,
    fedsa,
    ffa,
    flexlora,
    hetlora,
    homlora,
    perfedavg,
    pf2lora,
    pfedlora,
)
from pf2lora.config import ConfigError, ExperimentConfig

FAMILIES = ("lora", "heterogeneous")


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # one of FAMILIES
    description: str  # one line, shown by `pf2lora methods`
    build: Callable[..., tuple[Any, ...]]  # see the module docstring for each family's signature
    settings: tuple[str, ...] = ()  # the config sections it reads besides model, data, lora and train
    pooled: bool = False  # trains on every client's data pooled (one "client")
    federated: bool = True  # can run on a federation (engine=flower)
    check: Callable[[ExperimentConfig], None] | None = None  # its own checks, ConfigError on bad input
    export_note: str = ""  # what a client's exported stock adapter does not reproduce (its model card says it)
    averages: bool = False  # its server averages what clients send back: DP-FedAvg applies (dp.enabled)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"method name {self.name!r}: use lower-case letters, digits and _")
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: unknown family {self.family!r} (choose from {', '.join(FAMILIES)})")
        if not self.description.strip() or "\n" in self.description:
            raise ValueError(f"method {self.name}: give a one-line description")


_REGISTRY: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace``: over one of the same name). Returns it."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered (pass replace=True)")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names(family: str | None = None) -> list[str]:
    """Registered method names, in registration order (of one family where given)."""
    return [m.name for m in _REGISTRY.values() if family is None or m.family == family]


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (choose from {', '.join(names())})") from None


def family_of(cfg: ExperimentConfig) -> str:
    """The family of ``cfg``'s methods (one per run: :func:`check` refuses a mix)."""
    return get(cfg.algorithms[0]).family


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg.validate()`` and what depends on the methods: every name known, one family per run,
    each method's own checks, ``per_method`` naming known methods. Returns ``cfg``."""
    cfg.validate()
    methods = [get(name) for name in cfg.algorithms]
    for name in cfg.per_method:
        if name not in _REGISTRY:
            raise ConfigError(f"per_method: unknown method {name!r} (choose from {', '.join(names())})")
    families = {m.family for m in methods}
    if len(families) > 1:
        own = [m.name for m in methods if m.family == "heterogeneous"]
        rest = [m.name for m in methods if m.family != "heterogeneous"]
        raise ConfigError(
            f"algorithms: {', '.join(own)} train each client's own model and run apart from the LoRA methods "
            f"({', '.join(rest)}); run them separately"
        )
    if families == {"heterogeneous"} and cfg.task.name != "classification":
        raise ConfigError(f"algorithms: {', '.join(cfg.algorithms)} classify only (task.name={cfg.task.name})")
    for m in methods:
        if cfg.engine == "flower" and not m.federated:
            reason = "pools every client's data in one place" if m.pooled else "cannot run on a federation"
            raise ConfigError(f"{m.name} {reason}; it runs on engine=local only")
        if m.check is not None:
            m.check(cfg.for_method(m.name))
    for setting, on, what in (
        ("dp.enabled", cfg.dp.enabled, "DP-FedAvg"),
        ("flower.secure_aggregation", cfg.flower.secure_aggregation, "SecAgg+"),
    ):
        other = [m.name for m in methods if not m.averages]
        if on and other:
            raise ConfigError(
                f"{setting}: {', '.join(other)} do{'es' if len(other) == 1 else ''} not average the clients' updates; "
                f"{what} runs with {', '.join(n for n in names() if get(n).averages)}"
            )
    if cfg.dp.enabled:
        from pf2lora.algorithms.dp import accounting_available

        missing = accounting_available()
        if missing is not None:
            raise ConfigError(missing)
    return cfg


for _method in (
    Method(
        "pf2lora",
        "lora",
        "common LoRA averaged + personal LoRA per client, trained as a bilevel problem (the paper's method)",
        pf2lora.build,
        averages=True,
    ),
    Method("homlora", "lora", "FedAvg over one LoRA of rank r (the paper's HOMLoRA)", homlora.build, averages=True),
    Method(
        "hetlora",
        "lora",
        "heterogeneous ranks r_min..r_max, self-pruning, sparsity-weighted averaging (Cho et al. 2024)",
        hetlora.build,
        settings=("hetlora",),
    ),
    Method(
        "perfedavg",
        "lora",
        "MAML over one LoRA, one personalising SGD step before evaluation (Per-FedAvg-LoRA)",
        perfedavg.build,
        settings=("perfedavg",),
        averages=True,
    ),
    Method(
        "centralized",
        "lora",
        "one LoRA on every client's data pooled, the same number of steps (the reference bound)",
        centralized.build,
        pooled=True,
        federated=False,
    ),
    Method(
        "fedsa_lora",
        "lora",
        "A averaged, B stays on each client (FedSA-LoRA, Guo et al. 2025)",
        fedsa.build,
        averages=True,
    ),
    Method(
        "ffa_lora",
        "lora",
        "A frozen at a shared random init, only B trained and averaged (FFA-LoRA, Sun et al. 2024)",
        ffa.build,
        averages=True,
    ),
    Method(
        "flexlora",
        "lora",
        "ranks r_min..r_max; the server averages the products B_k A_k, hands out their truncated SVD (Bai et al. 2024)",
        flexlora.build,
        settings=("flexlora",),
    ),
    Method(
        "feddpa",
        "lora",
        "FedAvg global adapter + local adapter, mixed per test instance by similarity (FedDPA, Yang et al. 2024)",
        feddpa.build,
        settings=("feddpa",),
        averages=True,
        export_note=(
            "FedDPA weights the local adapter per test instance; a stock adapter cannot. This adapter is "
            "the model at the training weight (feddpa.local_weight): global B scaled by 1 - lambda, local B by lambda."
        ),
    ),
    Method(
        "fedex_lora",
        "lora",
        "A and B averaged, the residual of the products folded into the base weight: exact (Singhal et al. 2025)",
        fedex.build,
    ),
    Method(
        "pfedlora",
        "heterogeneous",
        "each client its own model + a shared low-rank adapter on a common representation (pFedLoRA)",
        pfedlora.build_pfedlora,
        settings=("pfedlora",),
    ),
    Method(
        "local",
        "heterogeneous",
        "each client trains its own model alone; nothing travels (pFedLoRA's baseline)",
        pfedlora.build_local,
        settings=("pfedlora",),
    ),
    Method(
        "fedavg",
        "heterogeneous",
        "FedAvg of one whole model (pfedlora.fedavg_model) shared by every client (pFedLoRA's baseline)",
        pfedlora.build_fedavg,
        settings=("pfedlora",),
    ),
):
    register(_method)


def build_algorithm(name: str, cfg: ExperimentConfig, base: Any, task: Any) -> tuple[Any, Any, Any]:
    """A LoRA-family method's (server, client, model) on ``base`` for ``task`` (benchmarks, scripts)."""
    method = get(name)
    if method.family != "lora":
        raise ConfigError(f"{name} is a {method.family} method; build_algorithm builds LoRA methods")
    return method.build(cfg, base, task)
