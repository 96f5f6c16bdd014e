"""What moves the toy's figures, behind the README's "What varies from run to run": the thread count, the CPU's
vector instructions, and the long tail of the KL estimate.

    python scripts/toy_variation.py builds                    # toy.py under each variant: do the files differ?
    python scripts/toy_variation.py runs [--toy_dir D]        # dpo.py under each variant on one toy: the figures
    python scripts/toy_variation.py kl RUN_DIR [RUN_DIR ...]  # a run's policy scored with 5 sampling seeds; its tail

A variant is a set of environment variables: OMP_NUM_THREADS=1 or 2, or AVX2 kernels on a CPU that has
AVX-512 (ATEN_CPU_CAPABILITY=avx2 for PyTorch's own kernels, MKL_ENABLE_INSTRUCTIONS=AVX2 for its matmuls),
which rounds much as a CPU without AVX-512 would. `builds` takes 1.5-2.5 minutes a variant, `runs` 1-2. The
README's tail: `python scripts/toy_results.py 1.0 --seeds 2 --out runs/t`, then `kl runs/t/beta1.0-seed2`.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VARIANTS = {"1 thread": {"OMP_NUM_THREADS": "1"}, "2 threads": {"OMP_NUM_THREADS": "2"},
            "AVX2": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def builds(out):
    """Build the toy once per variant into out/<variant>; print each file's sha256 and the meta's figures."""
    dirs = {}
    for name, env in VARIANTS.items():
        dirs[name] = os.path.join(out, name.replace(" ", "_"))
        subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "--dir", dirs[name]],
                       env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = sorted(os.path.relpath(os.path.join(d, f), dirs["1 thread"]) for d, _, fs in os.walk(dirs["1 thread"])
                   for f in fs if f != "meta.json")
    print("| file | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for f in files:
        print(f"| {f} | " + " | ".join(sha256(os.path.join(d, f)) for d in dirs.values()) + " |")
    for key in ("n_train_pairs", "n_test_pairs", "annotator_agrees_with_gold", "sft_mean_gold", "build_seconds"):
        metas = [json.load(open(os.path.join(d, "meta.json"))) for d in dirs.values()]
        print(f"| meta: {key} | " + " | ".join(str(m[key]) for m in metas) + " |")
    print(f"\nthe builds are in {out}; `runs --toy_dir {dirs['AVX2']}` trains on the AVX2 one")


def runs(out, toy_dir, seed):
    """python dpo.py --seed seed once per variant on the toy in toy_dir; the figures, and which runs match the first."""
    import toy
    toy_dir = toy.ensure_built(toy_dir or toy.DEFAULT_DIR)
    rows = {}
    for name, env in VARIANTS.items():
        run_dir = os.path.join(out, name.replace(" ", "_"))
        subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), "--seed", str(seed), "--output_dir", run_dir],
                       env={**os.environ, **env, "DPO_TOY_DIR": toy_dir}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows[name] = [json.loads(line) for line in f]
    print(f"toy {toy_dir}, seed {seed}; runs in {out}\n")
    print("| variant | held-out accuracy | gold reward | length | KL | metrics.jsonl as the first run's |")
    print("|---|---|---|---|---|---|")
    first = next(iter(rows.values()))
    for name, metrics in rows.items():
        accuracy = [m for m in metrics if "eval_rewards/accuracies" in m][-1]["eval_rewards/accuracies"]
        t = metrics[-1]
        print(f"| {name} | {accuracy:.3f} | {t['toy/gold_reward_before']:+.3f} -> {t['toy/gold_reward_after']:+.3f} "
              f"| {t['toy/length_before']:.1f} -> {t['toy/length_after']:.1f} | {t['toy/kl_after']:.2f} "
              f"| {'identical' if metrics == first else 'differs'} |")


def kl(run_dirs, n_seeds, tail):
    """Score each run's policy as toy.evaluate does, under n_seeds sampling seeds; per seed the KL, and the
    samples above `tail` nats (how many, on which prompts, and the mean without them)."""
    import torch
    import toy
    from common import collate, load_model, load_tokenizer, sample_responses, sequence_logps
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        args = saved.get("args", saved)  # dpo.py's args.json: the flags, maybe under "args"
        toy_dir = os.path.dirname(args["dataset"])
        tokenizer = load_tokenizer(run_dir)
        policy, reference = load_model(run_dir, "float32", "cpu"), load_model(args["model"], "float32", "cpu")
        prompts = toy.test_prompts(toy_dir)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        print(f"{run_dir} (beta {args['beta']}, seed {args['seed']}), {len(prompts)} test prompts:")
        for seed in range(n_seeds):
            with toy.one_thread(), torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                responses = sample_responses(policy, tokenizer, prompt_ids, 64, batch_size=256)
                ratios = []
                for s in range(0, len(prompts), 256):
                    batch = collate(list(zip(prompt_ids[s:s + 256], responses[s:s + 256])), tokenizer.pad_token_id)
                    ratios += (sequence_logps(policy, batch)[0] - sequence_logps(reference, batch)[0]).tolist()
            far = [i for i, r in enumerate(ratios) if r > tail]
            rest = [r for r in ratios if r <= tail]
            print(f"  sampling seed {seed}: KL {statistics.mean(ratios):.2f}, median sample "
                  f"{statistics.median(ratios):.2f}; {len(far)} samples above {tail:g} nats (largest "
                  f"{max(ratios):.0f}) on prompts {sorted(set(prompts[i] for i in far))}; KL without them "
                  f"{statistics.mean(rest):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["builds", "runs", "kl"], help="what to measure (see the docstring)")
    parser.add_argument("run_dirs", nargs="*", help="kl: dpo.py output directories on the toy")
    parser.add_argument("--out", default=None,
                        help="builds, runs: where the builds or runs go (default: a new temporary directory)")
    parser.add_argument("--toy_dir", default=None, help="runs: the toy to train on (default: $DPO_TOY_DIR or ~/.cache)")
    parser.add_argument("--seed", type=int, default=0, help="runs: dpo.py --seed (default: 0)")
    parser.add_argument("--sampling_seeds", type=int, default=5, help="kl: sampling seeds per run (default: 5)")
    parser.add_argument("--tail", type=float, default=50.0,
                        help="kl: a sample above this many nats is in the tail (default: 50)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="toy_variation-")
    if args.what == "builds":
        builds(out)
    elif args.what == "runs":
        runs(out, args.toy_dir, args.seed)
    else:
        if not args.run_dirs:
            parser.error("kl needs one or more dpo.py output directories")
        kl(args.run_dirs, args.sampling_seeds, args.tail)


if __name__ == "__main__":
    main()
