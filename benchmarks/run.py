"""`make bench`: every performance measurement, as ratios taken side by side in one run.

Writes ``benchmarks/results.json`` and prints a table with each target. Memory and scale are
measured in fresh processes (see ``memory.py`` and ``scale.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}


def _subprocess(module: str, *args: str, env: dict[str, str] = ENV) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=HERE.parent, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def payload_sizes() -> dict[str, float]:
    """Mean bytes per client per round, each way, of every method's serialized payload."""
    from benchmarks.steps import setup
    from pf2lora.methods import build_algorithm
    from pf2lora.utils import payload_bytes

    prepared = setup([])
    sizes = {}
    for method in ("pf2lora", "homlora", "hetlora"):
        server, _, _ = build_algorithm(method, prepared.cfg, prepared.base_model(), prepared.task)
        ids = list(range(prepared.cfg.data.num_clients))
        payloads = [payload_bytes(i.params) for i in server.configure_train(1, ids).values()]
        sizes[method] = sum(payloads) / len(payloads)
    return sizes


SECTIONS = ("steps", "memory", "scale", "workers", "deployment", "causal_lm")


def main() -> None:
    """Every section, or those ``BENCH_SECTIONS`` names (comma-separated): their results replace
    those of the last run in ``results.json``, which records the commit each section was measured at."""
    chosen = [x for x in os.environ.get("BENCH_SECTIONS", ",".join(SECTIONS)).split(",") if x]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        sys.exit(f"BENCH_SECTIONS: unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() and len(chosen) < len(SECTIONS) else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    measured = results.setdefault("measured_at", {})
    for section in chosen:
        print(f"== {section}", flush=True)
        results.update(globals()[f"_{section}"]())
        measured[section] = commit.strip() or "unknown"
    path.write_text(json.dumps(results, indent=2))
    print_table(results)


def _steps() -> dict:
    from benchmarks.roofline import matmul_peaks, memory_bandwidth
    from benchmarks.steps import hypergradient_agreement, step_times

    repeats = int(os.environ.get("BENCH_REPEATS", "5"))
    print("machine peaks: matrix products (fp32, bf16) and memory bandwidth...", flush=True)
    peaks, bandwidth = matmul_peaks(), memory_bandwidth()
    print("step times (interleaved; fp32 and bf16 base)...", flush=True)
    times, faults, counted = step_times(repeats=repeats, steps=8)
    home = times["homlora"]
    print("hypergradient agreement...", flush=True)
    cosine = hypergradient_agreement()
    achieved = {k: counted[k] / times[k] / 1e9 for k in times}
    return {
        "setup": "all-MiniLM-L6-v2, LoRA r=8 / r~=2 on query+value, batch 16 x 64 tokens, 2 CPU threads",
        "step_seconds": times,
        "step_ratio_to_homlora": {k: v / home for k, v in times.items()},
        "homlora_over_bare_peft": home / times["bare_peft"],
        "homlora_over_bare_peft_bf16": times["homlora_bf16"] / times["bare_peft_bf16"],
        "bf16_speedup": {
            k: times[k] / times[f"{k}_bf16"]
            for k in ("homlora", "bare_peft", "pf2lora_first_order", "pf2lora_finite_difference")
        },
        "step_page_faults": faults,
        "cosine_finite_difference_exact": cosine["finite_difference"],
        "hypergradient_cosine_to_fp32_exact": cosine,
        "roofline": {
            "matmul_gflops": peaks,
            "memory_gb_per_s": bandwidth,
            "step_gflop": {k: v / 1e9 for k, v in counted.items()},
            "step_gflops_achieved": achieved,
            "step_fraction_of_peak": {
                k: v / peaks["bfloat16" if k.endswith("_bf16") else "float32"]["peak"] for k, v in achieved.items()
            },
            "step_fraction_of_bf16_peak": {k: v / peaks["bfloat16"]["peak"] for k, v in achieved.items()},
        },
    }


def _memory() -> dict:
    print("peak step memory (fresh processes)...", flush=True)
    memory = {
        "homlora": _subprocess("benchmarks.memory", "homlora", "finite_difference"),
        **{
            f"pf2lora_{m}": _subprocess("benchmarks.memory", "pf2lora", m) for m in ("finite_difference", "first_order")
        },
    }
    print("payload sizes...", flush=True)
    return {
        "step_peak_memory_bytes": {k: v["step_peak_bytes"] for k, v in memory.items()},
        "step_peak_memory_ratio_to_homlora": {
            k: v["step_peak_bytes"] / memory["homlora"]["step_peak_bytes"] for k, v in memory.items()
        },
        "payload_bytes_per_client_round_each_way": payload_sizes(),
    }


def _scale() -> dict:
    scale_sizes = [int(n) for n in os.environ.get("BENCH_CLIENTS", "10,100,1000").split(",")]
    scale = []
    for n in scale_sizes:
        for where in ("memory", "disk") if n == max(scale_sizes) else ("memory",):
            print(f"scale: {n} clients, state in {where}...", flush=True)
            scale.append(_subprocess("benchmarks.scale", str(n), where))
    sampled = os.environ.get("BENCH_SAMPLED", "10000,0.01,3").split(",")
    print(f"scale: {sampled[0]} clients, {sampled[1]} of them per round, states on disk...", flush=True)
    scale_sampled = _subprocess("benchmarks.scale", sampled[0], "disk", sampled[1], sampled[2])
    return {"scale": scale, "memory_per_additional_client": marginal_memory(scale), "scale_sampled": scale_sampled}


# glibc's default allocator for the sections below, as a user's run has it: MALLOC_MMAP_THRESHOLD_
# makes every activation a fresh mapping, which costs two 1-thread workers a third of their speed, and
# the causal LM's steps 1.7x (470,000 page faults per HOMLoRA step against 61,000; measured)
PLAIN = {k: v for k, v in ENV.items() if k != "MALLOC_MMAP_THRESHOLD_"}


def _workers() -> dict:
    print("local engine: 2 worker processes, 1 worker process, 1 process (fresh processes)...", flush=True)
    workers = {n: _subprocess("benchmarks.workers", n, "2", env=PLAIN) for n in ("2", "pool1", "1")}
    workers["ceiling"] = _subprocess("benchmarks.workers", "ceiling", "pf2lora", env=PLAIN)
    return {"workers": workers, "workers_jemalloc": jemalloc_workers(PLAIN)}


def _deployment() -> dict:
    print("deployment on loopback against the local engine...", flush=True)
    return {"deployment": _subprocess("benchmarks.deployment", os.environ.get("BENCH_SITES", "shared,fork"), env=PLAIN)}


def _causal_lm() -> dict:
    print("causal LM: steps, generation and beam-search evaluation, fp32 and bf16 (fresh process)...", flush=True)
    return {"causal_lm": _subprocess("benchmarks.generation", env=PLAIN)}


def jemalloc_workers(env: dict[str, str]) -> dict:
    """The workers' rows again with jemalloc as every process's malloc (``pf2lora --allocator
    jemalloc``, which sets the same ``LD_PRELOAD``), where the system has it."""
    from pf2lora.allocator import resolve
    from pf2lora.config import ConfigError

    try:
        lib = resolve("jemalloc")
    except ConfigError as err:
        print(f"  skipped: {err}", flush=True)
        return {"skipped": str(err)}
    print(f"local engine under jemalloc ({lib}): 2 worker processes, 1 process...", flush=True)
    env = {**env, "LD_PRELOAD": lib}
    return {"library": lib, **{n: _subprocess("benchmarks.workers", n, "2", env=env) for n in ("2", "1")}}


def marginal_memory(scale: list[dict]) -> list[dict]:
    """Memory per additional client as the slope of resident memory between two numbers of clients
    (state in memory), over the size of a client's state. Each run's own estimate (its growth past
    the first tenth of its clients) is dominated, with few clients, by what the first full round
    allocates once."""
    runs = sorted((s for s in scale if s["client_state"] == "memory"), key=lambda s: s["clients"])
    return [
        {
            "from_clients": a["clients"],
            "to_clients": b["clients"],
            "bytes_per_client": (per := (b["rss_bytes"] - a["rss_bytes"]) / (b["clients"] - a["clients"])),
            "over_state": per / b["state_bytes_per_client"],
        }
        for a, b in zip(runs, runs[1:], strict=False)
    ]


def _bf16_rows(r: dict) -> list[tuple[str, str, str]]:
    """The bf16 base against the fp32 one, and the roofline: each step's share of the machine's peak."""
    rows = []
    speedup = r.get("bf16_speedup", {})
    for key, label, target in (
        ("homlora", "HOMLoRA step, fp32 base / bf16 base", ">= 1.5x"),
        ("pf2lora_first_order", "PF2LoRA first_order step, fp32 base / bf16 base", ">= 1.5x"),
        ("pf2lora_finite_difference", "PF2LoRA finite_difference step, fp32 base / bf16 base", "reported"),
        ("bare_peft", "bare PEFT step, fp32 / bf16 autocast", "reported"),
    ):
        if key in speedup:
            rows.append((label, f"{speedup[key]:.2f}x", target))
    if "homlora_over_bare_peft_bf16" in r:
        rows.append(
            (
                "HOMLoRA bf16 base step / bare PEFT bf16-autocast step",
                f"{r['homlora_over_bare_peft_bf16']:.2f}x",
                "<= 1.10x",
            )
        )
    cosine = r.get("hypergradient_cosine_to_fp32_exact", {})
    for key in ("finite_difference_bf16", "exact_bf16"):
        if key in cosine:
            rows.append(
                (f"cosine({key.removesuffix('_bf16')} with bf16 base, fp32 exact)", f"{cosine[key]:.7f}", ">= 0.999")
            )
    roof = r.get("roofline")
    if roof:
        mm, bw = roof["matmul_gflops"], roof["memory_gb_per_s"]
        rows.append(
            (
                "machine: matmul peak fp32 / bf16 (GFLOP/s), memory (GB/s)",
                f"{mm['float32']['peak']:.0f} / {mm['bfloat16']['peak']:.0f}, {bw:.0f}",
                "measured",
            )
        )
        for key in ("bare_peft", "homlora", "pf2lora_first_order", "homlora_bf16", "pf2lora_first_order_bf16"):
            if key in roof["step_gflops_achieved"]:
                rows.append(
                    (
                        f"  {key} step: GFLOP, GFLOP/s, share of its dtype's / bf16 peak",
                        f"{roof['step_gflop'][key]:.1f}, {roof['step_gflops_achieved'][key]:.0f}, "
                        f"{roof['step_fraction_of_peak'][key]:.0%} / {roof['step_fraction_of_bf16_peak'][key]:.0%}",
                        "reported",
                    )
                )
    return rows


def print_table(r: dict) -> None:
    ratio, mem = r["step_ratio_to_homlora"], r["step_peak_memory_ratio_to_homlora"]
    biggest = max(r["scale"], key=lambda s: (s["clients"], s["client_state"] == "memory"))
    rows = [
        ("PF2LoRA finite_difference step / HOMLoRA step", f"{ratio['pf2lora_finite_difference']:.2f}x", "<= 3.0x"),
        ("PF2LoRA first_order step / HOMLoRA step", f"{ratio['pf2lora_first_order']:.2f}x", "<= 2.1x"),
        ("PF2LoRA exact step / HOMLoRA step", f"{ratio['pf2lora_exact']:.2f}x", "reported"),
        ("PF2LoRA joint step / HOMLoRA step", f"{ratio['pf2lora_joint']:.2f}x", "reported"),
        ("HOMLoRA step / bare PyTorch+PEFT step", f"{r['homlora_over_bare_peft']:.2f}x", "<= 1.10x"),
        (
            "minor page faults per step, PF2LoRA fd / HOMLoRA",
            f"{r['step_page_faults']['pf2lora_finite_difference']:.0f} / {r['step_page_faults']['homlora']:.0f}",
            "reported",
        ),
        ("cosine(finite_difference, exact)", f"{r['cosine_finite_difference_exact']:.7f}", ">= 0.999"),
    ]
    rows += _bf16_rows(r)
    rows += [
        ("PF2LoRA fd peak step memory / HOMLoRA", f"{mem['pf2lora_finite_difference']:.2f}x", "<= 1.3x"),
        ("PF2LoRA first_order peak step memory / HOMLoRA", f"{mem['pf2lora_first_order']:.2f}x", "reported"),
    ]
    for method, size in r["payload_bytes_per_client_round_each_way"].items():
        rows.append((f"{method} payload per client per round, each way", f"{size / 1024:.1f} KiB", "reported"))
    for s in r["scale"]:
        rows.append(
            (
                f"{s['clients']} clients (state in {s['client_state']}): RSS, s/round "
                f"({s['clients_per_round']} trained)",
                f"{s['rss_bytes'] / 2**30:.2f} GiB, {s['seconds_per_round']:.1f}s",
                "<= 8 GiB" if s is biggest else "reported",
            )
        )
        rows.append(
            (
                f"  memory per additional client / its state ({s['state_bytes_per_client'] / 1024:.0f} KiB)",
                f"{s['memory_per_client_bytes'] / s['state_bytes_per_client']:.2f}x",
                "reported",
            )
        )
    slopes = r["memory_per_additional_client"]
    for m in slopes:
        rows.append(
            (
                f"memory per additional client, {m['from_clients']} -> {m['to_clients']} clients / its state",
                f"{m['over_state']:.2f}x",
                "<= 2x" if m is slopes[-1] else "reported",
            )
        )
    sampled = r.get("scale_sampled")
    if sampled:
        rows.append(
            (
                f"{sampled['clients']} clients, {sampled['clients_per_round']} per round (state on disk): "
                "peak RSS, s/round",
                f"{sampled['peak_rss_bytes'] / 2**30:.2f} GiB, {sampled['seconds_per_round']:.1f}s",
                "<= 2 GiB",
            )
        )
    workers = r.get("workers")
    if workers:
        two, one = workers["2"], workers["1"]
        rows += [
            (
                "local engine, 2 workers / 1 process: clients trained per second",
                f"{two['clients_per_second'] / one['clients_per_second']:.2f}x",
                ">= 1.3x",
            ),
            *(
                [
                    (
                        "  the most 2 processes side by side can gain here (threads scale "
                        f"{workers['ceiling']['thread_scaling']:.2f}x)",
                        f"{workers['ceiling']['process_ceiling']:.2f}x",
                        "reported",
                    )
                ]
                if "ceiling" in workers
                else []
            ),
            (
                "local engine, 2 workers / 1 process: peak memory (summed PSS)",
                f"{two['peak_pss_bytes'] / one['peak_pss_bytes']:.2f}x",
                "<= 1.3x",
            ),
            *(
                [
                    (
                        "local engine, 2 workers / 1 worker: clients trained per second",
                        f"{two['clients_per_second'] / workers['pool1']['clients_per_second']:.2f}x",
                        ">= 1.3x",
                    ),
                    (
                        "local engine, 2 workers / 1 worker: peak memory (summed PSS)",
                        f"{two['peak_pss_bytes'] / workers['pool1']['peak_pss_bytes']:.2f}x",
                        "<= 1.3x",
                    ),
                ]
                if "pool1" in workers
                else []
            ),
        ]
    jemalloc = r.get("workers_jemalloc", {})
    if "2" in jemalloc:
        two, one = jemalloc["2"], jemalloc["1"]
        rows += [
            (
                "the same under jemalloc (--allocator jemalloc): clients per second",
                f"{two['clients_per_second'] / one['clients_per_second']:.2f}x",
                ">= 1.3x",
            ),
            (
                "the same under jemalloc: peak memory (summed PSS)",
                f"{two['peak_pss_bytes'] / one['peak_pss_bytes']:.2f}x",
                "<= 1.3x",
            ),
        ]
        if workers:
            rows.append(
                (
                    "jemalloc / glibc, 1 process: clients per second, peak memory",
                    f"{one['clients_per_second'] / workers['1']['clients_per_second']:.2f}x, "
                    f"{one['peak_pss_bytes'] / workers['1']['peak_pss_bytes']:.2f}x",
                    "reported",
                )
            )
    deployment = r.get("deployment")
    if deployment:
        for mode in ("shared", "fork", "subprocess"):
            if f"loopback_{mode}_seconds" in deployment:
                rows.append(
                    (
                        f"loopback deployment ({mode} sites) / local engine, wall time",
                        f"{deployment[f'loopback_{mode}_seconds'] / deployment['local_seconds']:.2f}x",
                        "<= 2x" if mode == "shared" else "reported",
                    )
                )
    lm = r.get("causal_lm")
    if lm:
        lm_ratio, tokens = lm["step_ratio_to_homlora"], lm["generation_tokens_per_second"]
        rows += [
            ("causal LM: PF2LoRA fd step / HOMLoRA step", f"{lm_ratio['pf2lora_finite_difference']:.2f}x", "<= 3.0x"),
            (
                "causal LM: PF2LoRA first_order step / HOMLoRA step",
                f"{lm_ratio['pf2lora_first_order']:.2f}x",
                "<= 2.1x",
            ),
        ]
        for key, label in (("homlora", "HOMLoRA"), ("pf2lora_first_order", "PF2LoRA first_order")):
            if key in lm.get("bf16_speedup", {}):
                rows.append(
                    (f"causal LM: {label} step, fp32 base / bf16 base", f"{lm['bf16_speedup'][key]:.2f}x", "reported")
                )
        for dtype, d in lm.get("decoding_batch1", {}).items():
            rows.append(
                (
                    f"causal LM batch-1 greedy decoding, {dtype} base: tokens/s, bandwidth bound",
                    f"{d['tokens_per_second']:.0f} / {d['bandwidth_bound_tokens_per_second']:.0f}",
                    "reported",
                )
            )
        evaluated = lm.get("beam_search_evaluation")
        if evaluated:
            rows.append(
                (
                    "causal LM beam-search evaluation (4 beams): inputs/s before / fp32 / bf16",
                    " / ".join(f"{evaluated[k]['inputs_per_second']:.2f}" for k in ("before", "fp32", "bf16")),
                    "reported",
                )
            )
            rows.append(
                (
                    "  evaluation speed-up over before, fp32 base / bf16 base",
                    f"{lm['evaluation_speedup']['fp32']:.2f}x / {lm['evaluation_speedup']['bf16']:.2f}x",
                    ">= 3x",
                )
            )
        for beams in ("beams1", "beams4"):
            rows.append(
                (
                    f"causal LM generation, {beams[-1]} beam(s): tokens/s with / without KV cache",
                    f"{tokens[beams + '_cache']:.0f} / {tokens[beams + '_no_cache']:.0f}",
                    "reported",
                )
            )
    width = max(len(a) for a, _, _ in rows)
    print(f"\n{'measurement'.ljust(width)}  {'measured':>22}  target")
    for a, b, c in rows:
        print(f"{a.ljust(width)}  {b:>22}  {c}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:  # the table of the last run, without measuring again
        print_table(json.loads((HERE / "results.json").read_text()))
    else:
        main()
