"""dpo.py under torchrun against one process, on the same global batch: what the communication costs.

Each contender is a whole `dpo.py` run (loading, reference log-probs, training, checkpoint) in a fresh
process tree; it runs twice, for --short and --long steps, and the steady-state time a step is the difference
of the two wall times over the difference of the steps (start-up cancels out). Peak RSS is that of the largest
process of the tree (for torchrun: the largest rank). The 20M Llama of synthetic.py, vocab 2,048, fp32;
16 pairs a step of random tokens (prompt and responses 30-80 tokens each).

    python bench/distributed.py                 # ~12 min on 2 quiet cores
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from synthetic import ROOT, VOCAB, build_model, make_pairs, median, quietly

CONTENDERS = {  # name: (processes, threads a process, extra flags)
    "1 process, 2 threads": (1, 2, []),
    "1 process, 1 thread": (1, 1, []),
    "2 processes DDP, 1 thread each": (2, 1, ["--ddp"]),
    "2 processes FSDP2, 1 thread each": (2, 1, ["--fsdp"]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", type=int, default=2, help="steps of the short run")
    parser.add_argument("--long", type=int, default=12, help="steps of the long run")
    parser.add_argument("--pairs_per_step", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_data(folder, n):
    text = lambda ids: " ".join(f"t{i}" for i in ids if i > 1)  # the synthetic tokenizer's words; EOS is added back
    for name, count, seed in (("train", n, 0), ("eval", 8, 1)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            for p, c, r in make_pairs(VOCAB["20M"], n=count, seed=seed):
                f.write(json.dumps({"prompt": text(p), "chosen": text(c), "rejected": text(r)}) + "\n")


def child(spec):
    """Run one command; print its wall time and the peak RSS of the largest process it started."""
    spec = json.loads(spec)
    started = time.time()
    result = subprocess.run(spec["command"], cwd=ROOT, env={**os.environ, **spec["env"]}, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    print(json.dumps({"wall": wall, "rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def run(name, steps, model, data, pairs_per_step):
    processes, threads, extra = CONTENDERS[name]
    with tempfile.TemporaryDirectory() as out:
        flags = ["--model", model, "--dataset", os.path.join(data, "train.jsonl"),
                 "--eval_dataset", os.path.join(data, "eval.jsonl"), "--output_dir", os.path.join(out, "run"),
                 "--max_steps", str(steps), "--batch_size", str(pairs_per_step // processes), "--grad_accum", "1",
                 "--learning_rate", "1e-4", "--warmup_steps", "0", "--eval_every", "100000", "--save_every", "100000",
                 "--max_length", "256", "--dtype", "float32", *extra]
        launcher = ([sys.executable] if processes == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
        spec = {"command": launcher + ["dpo.py"] + flags, "env": {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}}
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{name}: {result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.child:
        return child(args.child)
    model = build_model("20M")
    data = tempfile.mkdtemp(prefix="dpo_bench_distributed_")
    write_data(data, args.long * args.pairs_per_step)
    results = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # the order rotated each round
            (short, long), others = quietly(lambda: [run(name, s, model, data, args.pairs_per_step)
                                                     for s in (args.short, args.long)])
            step = (long["wall"] - short["wall"]) / (args.long - args.short)
            results[name].append(dict(step=step, whole=long["wall"], rss=max(short["rss_mib"], long["rss_mib"]),
                                      others=others))
            print(f"round {r + 1}: {name}: {step:.3f} s/step, {long['wall']:.1f} s for {args.long} steps, "
                  f"peak RSS {results[name][-1]['rss']:.0f} MiB, others' CPU {others:.0%}", file=sys.stderr)
    base = {k: median([x[k] for x in results[names[0]]]) for k in ("step", "whole", "rss")}
    print(f"\n{args.pairs_per_step} pairs a step, medians of {args.rounds} rounds; ratios against '{names[0]}'")
    print(f"| contender | s / step (steady) | x | whole run, {args.long} steps (s) | x | peak RSS a process (MiB) | x | others' CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        m = {k: median([x[k] for x in results[name]]) for k in ("step", "whole", "rss", "others")}
        print(f"| {name} | {m['step']:.3f} | {m['step'] / base['step']:.2f} | {m['whole']:.1f} | "
              f"{m['whole'] / base['whole']:.2f} | {m['rss']:.0f} | {m['rss'] / base['rss']:.2f} | {m['others']:.0%} |")


if __name__ == "__main__":
    main()
