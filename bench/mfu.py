"""Model FLOPs utilisation of dpo.py's step on this CPU, and where the rest of the time goes.

    python bench/mfu.py            # both models, about 4 minutes on 2 CPU cores

FLOPs of one step (one forward + backward of 2B rows, batch 8 pairs, synthetic data as in vs_trl.py):
    6 x (backbone parameters) x (real tokens)  +  6 x V x H x (response tokens)       policy, forward + backward
  + 2 x (backbone parameters) x (real tokens)  +  2 x V x H x (response tokens)       reference forward, if any
The backbone is every parameter but the (tied) embedding, which is a lookup; the LM head (V x H) is counted only
on the positions it is applied to (the response tokens, see common.sequence_logps). Padding is not counted, nor
attention scores (2 x 2 x T x H per token and layer, about 5% here). The peak is what a large fp32 torch.matmul
reaches in this same run (best of a few square sizes, measured before and after the steps).
Three ways to run the step, their steps interleaved so that they share the machine's ups and downs: dpo.py's
default (precomputed reference), --ref_model (a frozen reference model), and the default with the plain
torch.optim.AdamW instead of dpo.py's fused one, to show what the optimizer costs.
"""
import argparse
import time

import torch

from synthetic import (VOCAB, build_model, dpo_optimizer, dpo_step, frozen_reference, load_model, make_pairs, median,
                       n_params, precomputed_reference, quietly)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(VOCAB), choices=list(VOCAB), help="which models")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and mode")
    parser.add_argument("--top", type=int, default=12, help="rows of the profiler table")
    return parser.parse_args()


def matmul_peak(sizes=(1024, 2048, 3072, 4096), repeats=5):
    """GFLOP/s of a large fp32 torch.matmul: the best size's median."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / median(times) / 1e9)
    return best


def step_flops(model, chunk, with_reference):
    V, H = model.get_output_embeddings().weight.shape
    backbone = n_params(model) - V * H  # tied embedding: counted as the head only
    real = sum(len(p) + len(r) for p, c, rj in chunk for r in (c, rj))
    response = sum(len(c) + len(rj) for _, c, rj in chunk)
    per_pass = backbone * real + V * H * response  # multiply-adds of one forward
    padded = 2 * len(chunk) * max(len(p) + len(r) for p, c, rj in chunk for r in (c, rj))
    return (6 + 2 * with_reference) * per_pass, real, response, padded


def profile_step(policy, optimizer, chunk, ref, top):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dpo_step(policy, optimizer, chunk, ref)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"matmul (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_"),
              "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward")}
    shares = {g: sum(e.self_cpu_time_total for e in events if e.key in names) / total for g, names in groups.items()}
    optimizer_total = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")) / total
    shares["AdamW step (all its ops)"] = optimizer_total
    shares["everything else (elementwise, norms, copies)"] = 1 - sum(shares.values())
    return shares, events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=55)


MODES = ("precomputed", "reference model", "precomputed, plain AdamW")


def time_steps(path, pairs, batches, args):
    """Step times and FLOPs of the three ways to run the step, their steps interleaved (one of each in turn)."""
    setups = {}
    for mode in MODES:
        policy = load_model(path).train()
        ref = frozen_reference(load_model(path)) if mode == "reference model" else precomputed_reference(policy, pairs)
        setups[mode] = (policy, dpo_optimizer(policy, fused=not mode.endswith("plain AdamW")), ref)
    times, flops = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
    for i, chunk in enumerate(batches[:args.warmup + args.steps]):
        for mode, (policy, optimizer, ref) in setups.items():
            start = time.perf_counter()
            dpo_step(policy, optimizer, chunk, ref)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
                flops[mode].append(step_flops(policy, chunk, mode == "reference model"))
    policy, optimizer, ref = setups["precomputed"]
    return times, flops, profile_step(policy, optimizer, batches[-1], ref, args.top)


def main():
    args = parse_args()
    peak_before, others_before = quietly(matmul_peak)
    rows, profiles = [], []
    for name in args.models:
        path = build_model(name)
        pairs = make_pairs(VOCAB[name], (args.warmup + args.steps + 1) * args.batch_size)
        batches = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
        (times, flops, profile), others = quietly(lambda: time_steps(path, pairs, batches, args))
        for mode in MODES:
            padding = sum(f[3] - f[1] for f in flops[mode]) / sum(f[3] for f in flops[mode])
            rows.append((name, mode, median(times[mode]), median([f[0] for f in flops[mode]]) / 1e9,
                         sum(f[0] for f in flops[mode]) / sum(times[mode]) / 1e9, padding, others))
        profiles.append((name, *profile))
    peak_after, others_after = quietly(matmul_peak)
    peak = max(peak_before, peak_after)

    print(f"fp32 matmul peak, measured: {peak_before:.0f} GFLOP/s before the steps, {peak_after:.0f} after "
          f"(others used {others_before:.0%} and {others_after:.0%} of the CPUs meanwhile); using {peak:.0f}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n| model | reference | median step (s) | GFLOP per step | GFLOP/s | MFU (of measured matmul peak) | "
          "padding | others' CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mode, step, gflop, rate, padding, others in rows:
        print(f"| {name} | {mode} | {step:.2f} | {gflop:.0f} | {rate:.0f} | {rate / peak:.0%} | {padding:.0%} | {others:.0%} |")
    for name, shares, table in profiles:
        print(f"\nProfile of one step, {name}, precomputed reference: share of the step's CPU time")
        for group, share in shares.items():
            print(f"  {group:45s} {share:6.1%}")
        print(table)


if __name__ == "__main__":
    main()
