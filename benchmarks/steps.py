"""Step time and hypergradient agreement on the bundled model, measured side by side in one process.

Each method runs ``local_steps`` steps of its real client code on the same client data, in
interleaved repetitions (A B C A B C ...), so machine noise hits every method alike; the median
per-step time of each is divided by HOMLoRA's, and its minor page faults per step are counted (memory the
allocator handed back to the OS and faults in again). The bare baseline is a plain PyTorch + PEFT LoRA
training step (``loss.backward(); AdamW.step()``) on the same batches.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.roofline import flops
from pf2lora.config import load_config
from pf2lora.families.lora import Prepared
from pf2lora.methods import build_algorithm
from pf2lora.runner import prepare

SEQUENCE_LENGTH = 64


def setup(overrides: list[str]) -> Prepared:
    """The default experiment's model, adapters and batch size, on BBC News articles truncated to
    exactly 64 tokens, so every method sees batches of one shape (16 x 64)."""
    cfg = load_config(
        "configs/default.yaml",
        [
            "data.dataset=bbc_news",
            f"model.max_length={SEQUENCE_LENGTH}",
            "data.max_examples=800",
            "data.max_test_examples=80",
            "train.threads=2",
            "train.workers=1",  # in this process: 2 torch threads (unset, the engine forks 1-thread workers)
            *overrides,
        ],
    )
    prepared = prepare(cfg)
    assert {len(ids) for ids in prepared.data.train[0].ids} == {SEQUENCE_LENGTH}
    return prepared


def _client_runner(prepared: Prepared, name: str, mode: str, steps: int) -> Callable[[], float]:
    train = dataclasses.replace(prepared.cfg.train, hypergradient=mode, local_steps=steps)
    cfg = dataclasses.replace(prepared.cfg, train=train)  # each runner its own config
    server, client, _ = build_algorithm(name, cfg, prepared.base_model(), prepared.task)
    data = prepared.data.train[0]
    state = client.init_state(0)
    counter = iter(range(1, 10**9))

    def run() -> float:
        nonlocal state
        instruction = server.configure_train(next(counter), [0])[0]
        started = time.perf_counter()
        _, state = client.train(0, instruction, state, data)
        return (time.perf_counter() - started) / steps

    return run


def _bare_peft_runner(prepared: Prepared, steps: int, autocast: bool = False) -> Callable[[], float]:
    """The step a user writes by hand: PEFT LoRA (r, alpha, targets as configured) + the head;
    ``autocast``: under ``torch.autocast`` in bf16, how a user lowers that step's precision."""
    cfg = prepared.cfg
    base = prepared.base_model()
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.lora_alpha, target_modules=cfg.lora.target_modules)
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():
        if ".classifier." in name or name.startswith("base_model.model.classifier"):
            p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    data, b = prepared.data.train[0], cfg.train.batch_size
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    position = 0

    def run() -> float:
        nonlocal position
        started = time.perf_counter()
        for _ in range(steps):
            idx = [order[(position + i) % len(order)] for i in range(b)]
            position += b
            batch = data.batch(idx)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / steps

    return run


def step_times(repeats: int = 5, steps: int = 5) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median seconds, minor page faults and FLOPs per step of every method, measured interleaved;
    ``_bf16`` rows: the same with the base in bf16 (``model.dtype=bfloat16``; the bare PEFT step
    under bf16 autocast)."""
    prepared, low = setup([]), setup(["model.dtype=bfloat16"])
    runners = {
        "homlora": _client_runner(prepared, "homlora", "finite_difference", steps),
        "bare_peft": _bare_peft_runner(prepared, steps),
        "pf2lora_finite_difference": _client_runner(prepared, "pf2lora", "finite_difference", steps),
        "pf2lora_first_order": _client_runner(prepared, "pf2lora", "first_order", steps),
        "pf2lora_exact": _client_runner(prepared, "pf2lora", "exact", steps),
        "pf2lora_joint": _client_runner(prepared, "pf2lora", "joint", steps),
        "homlora_bf16": _client_runner(low, "homlora", "finite_difference", steps),
        "bare_peft_bf16": _bare_peft_runner(prepared, steps, autocast=True),
        "pf2lora_finite_difference_bf16": _client_runner(low, "pf2lora", "finite_difference", steps),
        "pf2lora_first_order_bf16": _client_runner(low, "pf2lora", "first_order", steps),
    }
    for run in runners.values():  # warm-up: allocator, kernels
        run()
    counted = {k: flops(run) / steps for k, run in runners.items()}
    samples: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            samples[name].append(run())
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return medians, {k: statistics.median(v) for k, v in faults.items()}, counted


def hypergradient_agreement() -> dict[str, float]:
    """Cosine similarity with the exact fp32 hypergradient on the bundled model, at a point reached
    by a few PF2LoRA steps (so the personal adapter is non-zero): the finite-difference one in
    fp32, and the finite-difference and exact ones with the base in bf16 (at the same x, y)."""
    out = {}
    reference, x, y = None, None, None
    for dtype, modes in (("float32", ("exact", "finite_difference")), ("bfloat16", ("finite_difference", "exact"))):
        prepared = setup(["train.lower_lr=1.0", f"model.dtype={dtype}"])
        cfg = dataclasses.replace(prepared.cfg, train=dataclasses.replace(prepared.cfg.train, local_steps=5))
        server, client, model = build_algorithm("pf2lora", cfg, prepared.base_model(), prepared.task)
        data = prepared.data.train[0]
        if x is None:
            result, state = client.train(0, server.configure_train(1, [0])[0], client.init_state(0), data)
            x, y = result.params, state["personal"]
        both = data.batch(list(range(2 * cfg.train.batch_size)))
        pi = {k: v[: cfg.train.batch_size] for k, v in both.items()}
        xi = {k: v[cfg.train.batch_size :] for k, v in both.items()}
        model.train(False)  # no dropout: the two modes see exactly the same function
        for mode in modes:
            leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
            _, h, _ = client.bilevel_step(leaves, y, pi, xi, None, mode)
            grad = torch.cat([h[k].flatten() for k in sorted(h)]).double()
            if reference is None:
                reference = grad
                continue
            key = mode if dtype == "float32" else f"{mode}_bf16"
            out[key] = float(torch.nn.functional.cosine_similarity(reference, grad, dim=0))
    return out
