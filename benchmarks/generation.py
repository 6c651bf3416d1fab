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
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

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


def setup(folder: Path) -> Prepared:
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
        ],
    )
    prepared = prepare(cfg)
    data = prepared.data  # one client (num_clients=1)
    data.train, data.test = [_fixed_shape(data.train[0])], [_fixed_shape(data.test[0])]
    return prepared


def step_times(prepared: Prepared, repeats: int, steps: int) -> dict[str, float]:
    runners = {}
    for name, mode in (("homlora", "finite_difference"), ("pf2lora", "finite_difference"), ("pf2lora", "first_order")):
        train = dataclasses.replace(prepared.cfg.train, hypergradient=mode, local_steps=steps)
        cfg = dataclasses.replace(prepared.cfg, train=train)
        server, client, _ = build_algorithm(name, cfg, prepared.base_model(), prepared.task)
        runners[name if name == "homlora" else f"{name}_{mode}"] = (server, client, [client.init_state(0)])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(repeats + 1):  # the first round warms up
        for key, (server, client, state) in runners.items():
            instruction = server.configure_train(r + 1, [0])[0]
            started = time.perf_counter()
            _, state[0] = client.train(0, instruction, state[0], prepared.data.train[0])
            if r:
                times[key].append((time.perf_counter() - started) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def throughput(prepared: Prepared, repeats: int, prompts: int) -> dict[str, float]:
    """New tokens per second through a PF2LoRA client's adapters, with and without the KV cache."""
    server, client, model = build_algorithm("pf2lora", prepared.cfg, prepared.base_model(), prepared.task)
    params = {**server.configure_evaluate(1, [0])[0].params, **client.init_state(0)["personal"]}
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()}  # non-zero adapters
    model.train(False)
    data = prepared.data.test[0]
    batch = data.prompt_batch(list(range(min(prompts, data.num_inputs))), model.device)
    out: dict[str, float] = {}
    for beams in (1, 4):
        for cache in (True, False):
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                with torch.no_grad():
                    ids = model.generate(
                        params,
                        **batch,
                        num_beams=beams,
                        max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS,
                        use_cache=cache,
                        do_sample=False,
                        pad_token_id=data.pad_id,
                    )
                seconds.append(time.perf_counter() - started)
            new = (ids.shape[1] - batch["input_ids"].shape[1]) * ids.shape[0]
            out[f"beams{beams}_{'cache' if cache else 'no_cache'}"] = new / statistics.median(seconds)
    return out


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    with tempfile.TemporaryDirectory() as folder:
        prepared = setup(Path(folder))
        times = step_times(prepared, repeats=repeats, steps=2)
        tokens = throughput(prepared, repeats=max(1, repeats // 2), prompts=int(os.environ.get("BENCH_PROMPTS", "4")))
    print(
        json.dumps(
            {
                "setup": f"SmolLM2-135M (bundled-lm), LoRA r=4 / r~=2 on q_proj+v_proj, "
                f"batch {BATCH} x {SOURCE + TARGET} tokens, 2 threads",
                "step_seconds": times,
                "step_ratio_to_homlora": {k: v / times["homlora"] for k, v in times.items()},
                "generation_tokens_per_second": tokens,
                "kv_cache_speedup": {b: tokens[f"{b}_cache"] / tokens[f"{b}_no_cache"] for b in ("beams1", "beams4")},
            }
        )
    )


if __name__ == "__main__":
    main()
