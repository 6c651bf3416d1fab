"""The causal LM: PF2LoRA / HOMLoRA step ratios, and generation throughput with and without the
KV cache, on the bundled SmolLM2-135M-Instruct, measured side by side in one process.

Data: pairs cut from the bundled BBC News articles (a 24-token source, a 40-token target), so every
batch has one shape (4 x 64 tokens, the paper's batch size for generation). Generation: 4 prompts
(``BENCH_PROMPTS``), greedy and beam search of width 4, exactly 24 new tokens each, through a
PF2LoRA client's two-level adapter; tokens per second counts new tokens of the returned sequences.
Run as ``python -m benchmarks.generation``; prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.roofline import weight_bytes
from pf2lora.config import load_config
from pf2lora.data.sources import load_bbc_news
from pf2lora.families.lora import Prepared
from pf2lora.methods import build_algorithm
from pf2lora.runner import prepare
from pf2lora.tasks.generation import GenerationData

SOURCE, TARGET, BATCH, NEW_TOKENS = 24, 40, 4, 24


def _pairs(folder: Path, n: int = 64) -> Path:
    """Source / target pairs from BBC News: the first words of an article and the words after."""
    frame = load_bbc_news().head(n)
    words = [str(t).split() for t in frame["text"]]
    rows = [
        {"source": " ".join(w[:40]), "target": " ".join(w[40:120]), "key": str(k)}
        for w, k in zip(words, frame["label"], strict=True)
    ]
    path = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _fixed_shape(data: GenerationData) -> GenerationData:
    """Every pair cut to a SOURCE-token prompt and a TARGET-token target (one batch shape)."""
    ids = [
        p[:SOURCE] + i[len(p) :][:TARGET]
        for p, i in zip((data.prompts[r] for r in data.pair_input), data.ids, strict=True)
    ]
    assert {len(x) for x in ids} == {SOURCE + TARGET}, "articles too short for the benchmark's shape"
    prompts = [p[:SOURCE] for p in data.prompts]
    lengths = [SOURCE] * len(ids)
    return GenerationData(data.inputs, prompts, ids, lengths, data.pair_input, data.pad_id)


def setup(folder: Path, *overrides: str) -> Prepared:
    cfg = load_config(
        "configs/webnlg.yaml",
        [
            "model.name=bundled-lm",
            "data.dataset=file",
            f"data.path={_pairs(folder)}",
            "data.key_column=key",
            "data.num_clients=1",
            "data.partition=iid",
            "model.max_length=256",
            f"train.batch_size={BATCH}",
            "train.threads=2",
            "train.workers=1",  # in this process: 2 torch threads (unset, the engine forks 1-thread workers)
            *overrides,
        ],
    )
    prepared = prepare(cfg)
    data = prepared.data  # one client (num_clients=1)
    data.train, data.test = [_fixed_shape(data.train[0])], [_fixed_shape(data.test[0])]
    return prepared


def step_times(preparations: dict[str, Prepared], repeats: int, steps: int) -> tuple[dict, dict]:
    """Median seconds and FLOPs per step of HOMLoRA and PF2LoRA, per base dtype (interleaved)."""
    runners = {}
    for suffix, prepared in preparations.items():
        for name, mode in (
            ("homlora", "finite_difference"),
            ("pf2lora", "finite_difference"),
            ("pf2lora", "first_order"),
        ):
            train = dataclasses.replace(prepared.cfg.train, hypergradient=mode, local_steps=steps)
            cfg = dataclasses.replace(prepared.cfg, train=train)
            server, client, _ = build_algorithm(name, cfg, prepared.base_model(), prepared.task)
            key = (name if name == "homlora" else f"{name}_{mode}") + suffix
            runners[key] = (server, client, [client.init_state(0)], prepared.data.train[0])
    times: dict[str, list[float]] = {k: [] for k in runners}
    counted: dict[str, float] = {}
    for r in range(repeats + 1):  # the first round warms up
        for key, (server, client, state, data) in runners.items():
            instruction = server.configure_train(r + 1, [0])[0]
            if r == 0:  # the FLOPs of the warm-up round
                with FlopCounterMode(display=False) as counter:
                    _, state[0] = client.train(0, instruction, state[0], data)
                counted[key] = counter.get_total_flops() / steps
                continue
            started = time.perf_counter()
            _, state[0] = client.train(0, instruction, state[0], data)
            times[key].append((time.perf_counter() - started) / steps)
    return {k: statistics.median(v) for k, v in times.items()}, counted


def _client_params(prepared: Prepared) -> tuple[dict, object]:
    """A PF2LoRA client's parameters (non-zero adapters) and its model."""
    server, client, model = build_algorithm("pf2lora", prepared.cfg, prepared.base_model(), prepared.task)
    params = {**server.configure_evaluate(1, [0])[0].params, **client.init_state(0)["personal"]}
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    model.train(False)
    return params, model


def decoding(prepared: Prepared, repeats: int) -> dict[str, float]:
    """Batch-1 greedy decoding through a PF2LoRA client's adapters: new tokens per second, and the
    bound the weights' memory traffic puts on it (each token reads every weight once)."""
    params, model = _client_params(prepared)
    data = prepared.data.test[0]
    with torch.no_grad():  # warm-up
        model.generate(params, **data.prompt_batch([0], model.device), max_new_tokens=2, pad_token_id=data.pad_id)
    new, seconds = _timed_generation(model, params, data, [0], repeats)
    return {"tokens_per_second": new / seconds, "weight_bytes": weight_bytes(model.model)}


def _timed_generation(model, params: dict, data, rows: list[int], repeats: int, **kwargs) -> tuple[int, float]:
    """New tokens of ``generate`` (exactly NEW_TOKENS per sequence, no sampling) over the prompts
    of ``rows``, and its median seconds over ``repeats`` calls."""
    batch = data.prompt_batch(rows, model.device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(
                params,
                **batch,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=data.pad_id,
                **kwargs,
            )
        seconds.append(time.perf_counter() - started)
    return (ids.shape[1] - batch["input_ids"].shape[1]) * ids.shape[0], statistics.median(seconds)


def webnlg_inputs(n: int) -> pd.DataFrame:
    """``n`` WebNLG-style inputs: 1 to 5 triples ``subject | property | object`` joined with `` ; ``,
    built from words of the bundled BBC News articles (WebNLG's own data needs a download)."""
    words = [w.strip(".,\"'()") for t in load_bbc_news()["text"].head(200) for w in str(t).split()]
    names = [w for w in words if w[:1].isupper() and len(w) > 3][:4000]
    properties = ["location", "birthPlace", "country", "leader", "capital", "genre", "starring", "club", "language"]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        triples = [
            f"{'_'.join(rng.choice(names, 2))} | {rng.choice(properties)} | {'_'.join(rng.choice(names, 2))}"
            for _ in range(int(rng.integers(1, 6)))
        ]
        rows.append({"source": " ; ".join(triples), "references": ["A reference sentence."], "key": str(i % 4)})
    return pd.DataFrame(rows)


def evaluation(folder: Path, inputs: int, repeats: int = 1) -> dict[str, dict[str, float]]:
    """Beam-search evaluation (4 beams, up to 96 new tokens, the WebNLG decoding settings) of
    ``inputs`` WebNLG-style inputs through a PF2LoRA client's model, in inputs per second:
    ``before`` as evaluation ran before the bf16 base (fp32, through the adapters, batches of
    ``eval_batch_size // num_beams`` inputs in their order), then ``evaluate`` with an fp32 base
    (adapters folded into the weights, batches of task.eval_tokens tokens) and a bf16 base."""
    from pf2lora.adapters.two_level import ModelAt
    from pf2lora.tasks.generation import encode

    frame = webnlg_inputs(inputs)
    out: dict[str, dict[str, float]] = {}
    for label, dtype in (("before", "float32"), ("fp32", "float32"), ("bf16", "bfloat16")):
        prepared = setup(folder, f"model.dtype={dtype}", "task.num_beams=4", "task.max_new_tokens=96")
        params, model = _client_params(prepared)
        data = encode(frame, prepared.task.tokenizer, 256)
        batch_size = prepared.cfg.train.eval_batch_size
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            if label == "before":
                task, width = prepared.task, max(1, batch_size // 4)
                forward = ModelAt(functools.partial(model.outputs, params), functools.partial(model.generate, params))
                with torch.no_grad():
                    for first in range(0, len(data), batch_size):
                        b = data.batch(list(range(first, min(first + batch_size, len(data)))))
                        task.loss(forward(b), b, reduction="sum")
                    for first in range(0, data.num_inputs, width):
                        task.generate(
                            forward, data, list(range(first, min(first + width, data.num_inputs))), model.device
                        )
            else:
                model.evaluate(params, data, batch_size)
            seconds.append(time.perf_counter() - started)
        out[label] = {"inputs_per_second": inputs / statistics.median(seconds), "seconds": statistics.median(seconds)}
    return out


def throughput(prepared: Prepared, repeats: int, prompts: int) -> dict[str, float]:
    """New tokens per second through a PF2LoRA client's adapters, with and without the KV cache."""
    params, model = _client_params(prepared)
    data = prepared.data.test[0]
    rows = list(range(min(prompts, data.num_inputs)))
    out: dict[str, float] = {}
    for beams in (1, 4):
        for cache in (True, False):
            new, seconds = _timed_generation(model, params, data, rows, repeats, num_beams=beams, use_cache=cache)
            out[f"beams{beams}_{'cache' if cache else 'no_cache'}"] = new / seconds
    return out


def main() -> None:
    from benchmarks.roofline import memory_bandwidth

    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    with tempfile.TemporaryDirectory() as folder:
        preparations = {"": setup(Path(folder)), "_bf16": setup(Path(folder), "model.dtype=bfloat16")}
        times, counted = step_times(preparations, repeats=repeats, steps=2)
        tokens = throughput(
            preparations[""], repeats=max(1, repeats // 2), prompts=int(os.environ.get("BENCH_PROMPTS", "4"))
        )
        bandwidth = memory_bandwidth()
        decode = {}
        for suffix, prepared in preparations.items():
            d = decoding(prepared, repeats)
            d["bandwidth_bound_tokens_per_second"] = bandwidth * 1e9 / d["weight_bytes"]
            d["fraction_of_bound"] = d["tokens_per_second"] / d["bandwidth_bound_tokens_per_second"]
            decode["fp32" if not suffix else "bf16"] = d
        evaluated = evaluation(Path(folder), int(os.environ.get("BENCH_EVAL_INPUTS", "32")))
    print(
        json.dumps(
            {
                "setup": f"SmolLM2-135M (bundled-lm), LoRA r=4 / r~=2 on q_proj+v_proj, "
                f"batch {BATCH} x {SOURCE + TARGET} tokens, 2 threads",
                "step_seconds": times,
                "step_ratio_to_homlora": {k: v / times["homlora"] for k, v in times.items() if not k.endswith("_bf16")},
                "step_ratio_to_homlora_bf16": {
                    k: v / times["homlora_bf16"] for k, v in times.items() if k.endswith("_bf16")
                },
                "bf16_speedup": {k: times[k] / times[f"{k}_bf16"] for k in times if not k.endswith("_bf16")},
                "step_gflop": {k: v / 1e9 for k, v in counted.items()},
                "step_gflops_achieved": {k: counted[k] / times[k] / 1e9 for k in times},
                "generation_tokens_per_second": tokens,
                "kv_cache_speedup": {b: tokens[f"{b}_cache"] / tokens[f"{b}_no_cache"] for b in ("beams1", "beams4")},
                "memory_gb_per_s": bandwidth,
                "decoding_batch1": decode,
                "beam_search_evaluation": evaluated,
                "evaluation_speedup": {
                    k: evaluated[k]["inputs_per_second"] / evaluated["before"]["inputs_per_second"]
                    for k in ("fp32", "bf16")
                },
            }
        )
    )


if __name__ == "__main__":
    main()
