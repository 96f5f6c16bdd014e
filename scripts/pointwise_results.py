"""The README's point-wise table: point-wise DPO (binary and continuous labels), ULMA, and DPO on the toy task,
all from the same labelled completions (the toy's training pairs), several seeds each.

    python scripts/pointwise_results.py                 # 6 variants x 3 seeds, two runs at a time: 32 min on 2 busy CPU cores
    python scripts/pointwise_results.py --seeds 0 --variants binary,ulma

The data: the toy's unpaired.jsonl holds both completions of each training pair, labelled `label` (gold reward
> 0) and `score` (the gold reward); DPO trains on the same completions as pairs (train_pairs.jsonl, ordered by
the toy's noisy annotator). High-quality demonstrations: for each training prompt, the best (by gold reward) of
--n finished samples of the SFT model; "golden" variants train on them as positives and on the labelled
negatives, as the paper's HH-Golden set replaces the chosen answers and keeps the rejected ones. Every run uses
the toy's defaults; the runs on the golden data name --model and --dataset, so this script evaluates their
final model itself with the same toy.evaluate (same prompts, same seed) that the toy runs use.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pointwise_dpo  # noqa: E402  (the toy defaults, so the golden runs use exactly the toy run's flags)
import toy  # noqa: E402

EVALUATING = threading.Lock()

VARIANTS = {  # name: (script, flags, positives)
    "sft": (None, [], "- (no training: the SFT model)"),
    "binary": ("pointwise_dpo.py", [], "label true"),
    "continuous": ("pointwise_dpo.py", ["--loss_type", "continuous", "--label_column", "score"], "score as target"),
    "ulma": ("pointwise_dpo.py", ["--ulma"], "label true (SFT)"),
    "binary-golden": ("pointwise_dpo.py", ["GOLDEN"], "best-of-n"),
    "ulma-golden": ("pointwise_dpo.py", ["GOLDEN", "--ulma"], "best-of-n (SFT)"),
    "dpo": ("dpo.py", [], "pairs"),
}


def make_golden(toy_dir, n, directory):
    """negatives.jsonl (the labelled negatives) and best.jsonl (per prompt, the best of n SFT samples)."""
    import torch
    from common import load_model, load_tokenizer, sample_responses
    with open(os.path.join(toy_dir, "unpaired.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    prompts = sorted({r["prompt"] for r in rows})
    sft = os.path.join(toy_dir, "sft")
    model, tokenizer = load_model(sft, device="cpu").eval(), load_tokenizer(sft)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy model is too small to share among threads (see toy.one_thread)
    samples = sample_responses(model, tokenizer, ids * n, max_new_tokens=64, batch_size=256)
    torch.set_num_threads(threads)
    best = {}
    for i, response in enumerate(samples):
        if response[-1:] != [tokenizer.eos_token_id]:
            continue  # unfinished
        text = tokenizer.decode(response[:-1])
        prompt = prompts[i % len(prompts)]
        if text.strip() and (prompt not in best or toy.gold_reward(text) > toy.gold_reward(best[prompt])):
            best[prompt] = text
    with open(os.path.join(directory, "best.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in best.items())
    with open(os.path.join(directory, "negatives.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if not r["label"])
    gold = lambda texts: statistics.mean(map(toy.gold_reward, texts))
    return dict(demos=len(best), demo_gold=gold(best.values()), positive_gold=gold(r["completion"] for r in rows if r["label"]),
                negative_gold=gold(r["completion"] for r in rows if not r["label"]))


def run(variant, seed, toy_dir, golden_dir):
    script, flags, _ = VARIANTS[variant]
    out = os.path.join(tempfile.mkdtemp(), "run")
    if "GOLDEN" in flags:  # the toy run's flags, on the golden data
        toy_flags = [a for k, v in pointwise_dpo.TOY_DEFAULTS.items() for a in (f"--{k}", str(v))]
        flags = ["--model", os.path.join(toy_dir, "sft"), "--dataset", os.path.join(golden_dir, "negatives.jsonl"),
                 "--sft_dataset", os.path.join(golden_dir, "best.jsonl"), *toy_flags, *flags[1:]]
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs at a time on 2 cores
    if script is None:  # the SFT model, evaluated as the runs are, without training
        out, metrics = os.path.join(toy_dir, "sft"), [{"eval_rewards/accuracies": None}]
    else:
        subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--seed", str(seed), "--output_dir", out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
    evals = [m for m in metrics if "eval_rewards/accuracies" in m]
    result = dict(variant=variant, seed=seed, accuracy=evals[-1]["eval_rewards/accuracies"])
    if "toy/gold_reward_after" in metrics[-1]:
        result.update({k: metrics[-1][f"toy/{k}_after"] for k in ("gold_reward", "length", "kl")})
    else:  # the same evaluation as the toy runs': toy.evaluate on the test prompts with the run's seed
        import torch
        from common import load_model, load_tokenizer
        torch.set_num_threads(1)
        with EVALUATING:  # one at a time: loading models is not thread-safe
            reference = load_model(os.path.join(toy_dir, "sft"), device="cpu").eval()
            policy = load_model(out, device="cpu").eval()
            result.update(toy.evaluate(policy, reference, load_tokenizer(out), toy.test_prompts(toy_dir), seed=seed))
        result["accuracy"] = None  # its held-out rows are negatives only (or no run)
    result["wall"] = time.time() - start
    print(f"{variant} seed {seed}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})}",
          file=sys.stderr, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--n", type=int, default=24, help="samples per prompt for the best-of-n demonstrations")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    args = parser.parse_args()
    seeds, variants = [int(s) for s in args.seeds.split(",")], args.variants.split(",")
    toy_dir = toy.ensure_built()
    golden_dir = tempfile.mkdtemp()
    start = time.time()
    data = make_golden(toy_dir, args.n, golden_dir) if any("golden" in v for v in variants) else {}
    print(f"data: {json.dumps({k: round(v, 3) for k, v in data.items()})} ({time.time() - start:.0f} s)", file=sys.stderr)
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run(*job, toy_dir, golden_dir), [(v, s) for v in variants for s in seeds]))
    stats = lambda xs, sign="+": (f"{statistics.mean(xs):{sign}.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""))
    print(f"\n{len(seeds)} seeds ({args.seeds}); mean ± sd over seeds; samples on the toy's test prompts. Total {time.time() - start:.0f} s.")
    if data:
        print(f"Training data, mean gold reward: label-true completions {data['positive_gold']:+.2f}, label-false "
              f"{data['negative_gold']:+.2f}, best-of-{args.n} demonstrations {data['demo_gold']:+.2f} ({data['demos']} prompts).")
    print()
    print("| variant | positives | gold reward | length, words | KL(policy ‖ SFT), nats | held-out accuracy | wall time per run |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        acc = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        print(f"| {v} | {VARIANTS[v][2]} | {stats([r['gold_reward'] for r in rs])} | {stats([r['length'] for r in rs], '')} | "
              f"{stats([r['kl'] for r in rs], '')} | {stats(acc, '') if acc else '-'} | "
              f"{statistics.mean(r['wall'] for r in rs):.0f} s |")


if __name__ == "__main__":
    main()
