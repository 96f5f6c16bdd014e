"""Sampling throughput (common.sample_responses) and how dpo.py's step time scales with tokens.

    python bench/generation.py                  # both parts, about 5 minutes on 2 CPU cores
    python bench/generation.py --part sampling  # or --part scaling, --part memory, --part shared

1. sampling: samples/s of common.sample_responses batched (one left-padded batch, KV cache) against one prompt
   at a time (batch_size=1, KV cache too), on the toy model (toy.ensure_built(): built once, ~2 minutes) and on
   the 20M model (synthetic prompts, random weights, so nearly every sample runs to --max-new-tokens).
3. memory: peak RSS of common.sample_responses on the 20M model at several batch sizes, each in its own process,
   fitted as a line (fixed + per sample), and the largest sampling batch that fits in a few memory budgets.
2. scaling: median time of dpo.py's step (precomputed reference, synthetic.dpo_step) on the 20M model for
   batch sizes x sequence lengths, every sequence exactly that long (prompt and response half each).
4. shared: common.sample_responses on rows that repeat their prompts (K samples of each of --shared-prompts
   prompts in one batch, as d2po.py draws 2 and dice.py K), each prompt computed once (common._prompt_cache, the
   default) against every row computed in full (generate on the whole batch), on the 20M model, every sample
   exactly --max-new-tokens long; the two alternate, --shared-rounds times each, from the same seed, and must
   draw the same tokens.
"""
import argparse
import json
import os
import time

import torch

from synthetic import (VOCAB, build_model, dpo_optimizer, dpo_step, load_model, make_pairs, median, n_params,
                       precomputed_reference, quietly)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="both", choices=["both", "sampling", "scaling", "memory", "shared"], help="what to run")
    parser.add_argument("--shared-prompts", type=int, default=8, help="shared: distinct prompts in the batch")
    parser.add_argument("--shared-k", type=int, nargs="+", default=[2, 16], help="shared: samples per prompt (d2po.py: 2, dice.py: 16)")
    parser.add_argument("--shared-rounds", type=int, default=5, help="shared: runs of each, alternating")
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[8, 32, 128], help="memory: batch sizes")
    parser.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=64, help="prompts to sample for")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="sampled tokens at most per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16], help="scaling: pairs per step")
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512], help="scaling: tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="scaling: timed steps per point, after one warm-up")
    return parser.parse_args()


def sampling(args):
    from transformers import AutoTokenizer
    import toy
    from common import sample_responses
    toy_dir = toy.ensure_built()
    toy_tokenizer = AutoTokenizer.from_pretrained(os.path.join(toy_dir, "sft"))
    with open(os.path.join(toy_dir, "test_prompts.jsonl")) as f:
        toy_prompts = [toy_tokenizer(json.loads(line)["prompt"])["input_ids"] for line in f][:args.prompts]
    path = build_model("20M")
    synthetic_prompts = [p for p, _, _ in make_pairs(VOCAB["20M"], args.prompts, seed=1)]
    setups = [("toy", os.path.join(toy_dir, "sft"), toy_tokenizer, toy_prompts),
              ("20M", path, AutoTokenizer.from_pretrained(path), synthetic_prompts)]
    print(f"\n{args.prompts} prompts, at most {args.max_new_tokens} new tokens each, pure sampling, fp32\n")
    print("| model | prompt tokens (mean) | mode | seconds | samples/s | new tokens/s | time vs batched | others' CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model_path, tokenizer, prompts in setups:
        model = load_model(model_path).eval()
        name = f"{name} ({n_params(model) / 1e6:.1f}M, vocab {model.config.vocab_size})"
        sample_responses(model, tokenizer, prompts[:4], 8)  # warm-up
        results = []
        for mode, batch_size in (("batched, KV cache", len(prompts)), ("one at a time, KV cache", 1)):
            def run():
                torch.manual_seed(0)
                start = time.perf_counter()
                responses = sample_responses(model, tokenizer, prompts, args.max_new_tokens, batch_size=batch_size)
                return responses, time.perf_counter() - start
            (responses, seconds), others = quietly(run)
            results.append(seconds)
            print(f"| {name} | {sum(map(len, prompts)) / len(prompts):.0f} | {mode} | {seconds:.1f} | "
                  f"{len(prompts) / seconds:.1f} | {sum(map(len, responses)) / seconds:.0f} | "
                  f"{seconds / results[0]:.1f}x | {others:.0%} |",
                  flush=True)


def scaling(args):
    path = build_model("20M")
    print(f"\ndpo.py's step (precomputed reference) on the 20M model; median of {args.steps} steps after one warm-up\n")
    print("| pairs | tokens per sequence | tokens per step | median step (s) | ms per 1k tokens | others' CPU |")
    print("|---|---|---|---|---|---|")
    points = [(b, 128) for b in args.batches] + [(8, t) for t in args.seqs if t != 128]
    for batch, seq in points:
        half = seq // 2
        pairs = make_pairs(VOCAB["20M"], batch * (args.steps + 1), prompt_len=(half, half), response_len=(half, half))

        def run():
            policy = load_model(path).train()
            ref = precomputed_reference(policy, pairs, batch)
            optimizer = dpo_optimizer(policy)
            times = []
            for i in range(args.steps + 1):
                start = time.perf_counter()
                dpo_step(policy, optimizer, pairs[i * batch:(i + 1) * batch], ref)
                times.append(time.perf_counter() - start)
            return median(times[1:])
        step, others = quietly(run)
        tokens = 2 * batch * seq
        print(f"| {batch} | {seq} | {tokens} | {step:.2f} | {1e6 * step / tokens:.0f} | {others:.0%} |", flush=True)


def memory(args):
    """Peak RSS of one sampling batch, each batch size in a fresh process; a least-squares line through them."""
    import subprocess
    import sys
    from synthetic import peak_rss_mib, rss_mib
    if args.child_batch:
        from transformers import AutoTokenizer
        from common import sample_responses
        path = build_model("20M")
        model, tokenizer = load_model(path).eval(), AutoTokenizer.from_pretrained(path)
        prompts = [p for p, _, _ in make_pairs(VOCAB["20M"], args.child_batch, seed=1)]
        loaded = rss_mib()
        torch.manual_seed(0)
        responses = sample_responses(model, tokenizer, prompts, args.max_new_tokens, batch_size=args.child_batch)
        return print(json.dumps(dict(loaded=loaded, peak=peak_rss_mib(), tokens=sum(map(len, responses)))))
    print(f"\nsampling memory, 20M model (fp32), prompts 30-80 tokens, {args.max_new_tokens} new tokens at most\n")
    print("| batch | RSS after loading (MiB) | peak RSS (MiB) | peak - loaded (MiB) | per sample (MiB) |")
    print("|---|---|---|---|---|")
    points = []
    for batch in args.memory_batches:
        out = subprocess.run([sys.executable, __file__, "--part", "memory", "--child-batch", str(batch),
                              "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
        row = json.loads(out.stdout.strip().splitlines()[-1])
        points.append((batch, row["peak"] - row["loaded"], row["loaded"]))
        print(f"| {batch} | {row['loaded']:.0f} | {row['peak']:.0f} | {row['peak'] - row['loaded']:.0f} | "
              f"{(row['peak'] - row['loaded']) / batch:.2f} |", flush=True)
    mx, my = sum(b for b, _, _ in points) / len(points), sum(m for _, m, _ in points) / len(points)
    slope = sum((b - mx) * (m - my) for b, m, _ in points) / sum((b - mx) ** 2 for b, _, _ in points)
    fixed, loaded = my - slope * mx, max(l for _, _, l in points)
    kv = 2 * 6 * 4 * 64 * 4 * (55 + args.max_new_tokens) / 2**20  # K and V, 6 layers, 4 KV heads of 64, fp32
    print(f"\nfit: {fixed:.0f} MiB + {slope:.2f} MiB per sample on top of {loaded:.0f} MiB loaded "
          f"(the KV cache alone: {kv:.2f} MiB per sample at the mean prompt of 55 tokens)")
    for budget in (1, 4, 16):
        print(f"largest batch in {budget} GiB of RSS: {int((budget * 1024 - loaded - fixed) / slope)}")


def shared(args):
    import common
    from transformers import AutoTokenizer
    path = build_model("20M")
    model, tokenizer = load_model(path).eval(), AutoTokenizer.from_pretrained(path)
    model.generation_config.min_new_tokens = args.max_new_tokens  # every sample exactly max_new_tokens long
    prompts = [p for p, _, _ in make_pairs(VOCAB["20M"], args.shared_prompts, seed=1)]
    once = common._prompt_cache
    print(f"\nsample_responses, 20M model (fp32), {len(prompts)} prompts of {sum(map(len, prompts)) / len(prompts):.0f} "
          f"tokens on average, K samples of each in one batch (rows: the prompts, K times over), "
          f"{args.max_new_tokens} new tokens each; median of {args.shared_rounds} alternating runs\n")
    print("| K | rows | prompt computed | median s | time vs whole batch | same tokens drawn | others' CPU |")
    print("|---|---|---|---|---|---|---|")
    for k in args.shared_k:
        rows = prompts * k
        times, drawn = {"once": [], "in every row": []}, {}
        for _ in range(args.shared_rounds):
            for mode in times:
                common._prompt_cache = once if mode == "once" else (lambda *unused: None)

                def run():
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    return common.sample_responses(model, tokenizer, rows, args.max_new_tokens), time.perf_counter() - start
                (drawn[mode], seconds), others = quietly(run)
                times[mode].append((seconds, others))
        common._prompt_cache = once
        base = median([t for t, _ in times["in every row"]])
        for mode, runs in times.items():
            t = median([s for s, _ in runs])
            print(f"| {k} | {len(rows)} | {mode} | {t:.3f} | {t / base:.2f}x | "
                  f"{'yes' if drawn['once'] == drawn['in every row'] else 'NO'} | {max(o for _, o in runs):.0%} |", flush=True)


def main():
    args = parse_args()
    torch.manual_seed(0)
    if args.part == "memory":
        return memory(args)
    if args.part == "shared":
        return shared(args)
    if args.part in ("both", "sampling"):
        sampling(args)
    if args.part in ("both", "scaling"):
        scaling(args)


if __name__ == "__main__":
    main()
