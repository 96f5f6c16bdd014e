"""pointwise_dpo.py against TRL's KTOTrainer, head to head: same weights, same token ids, same batch size.

    python bench/vs_kto.py --model 20M --rounds 4        # the measurement: about 10 minutes on 2 quiet CPU cores
    DPO_BENCH_MAX_WAIT=0 python bench/vs_kto.py --rounds 1 --warmup 1 --steps 2      # a check that it runs: 8 min
                                                         # on a busy machine (each process run 3 times), 2 when quiet

Point-wise DPO (binary labels) and KTO learn from the same data, completions labelled good or bad, which is
what a user with thumbs-up/down data has; KTOTrainer is what TRL offers such a user. The two losses are
different functions and do different amounts of work per step, so the table states beside its figures how
many forward rows each contender runs per optimizer step (B = --batch-size completions):
    kto              KTOTrainer with a reference model (its default): 4B forward rows a step: the policy on the B
                     completions (with backward), the policy on B mismatched prompt/completion pairs for KTO's
                     KL estimate (no grad), and the reference model on both (no grad, 2B rows)
    kto-precompute   KTOTrainer(precompute_ref_log_probs=True): 2B forward rows a step (the policy's two), and
                     before training 2N rows once (the reference log-probs of the N completions and of their N
                     mismatched pairs)
    ours             pointwise_dpo.py's default, reference log-probs precomputed with the initial policy:
                     B forward rows a step (with backward), and N rows once before training
    ours-ref-model   pointwise_dpo.py --ref_model: 2B forward rows a step (the policy's B, the reference's B)
Every contender runs one backward over B rows a step. The mismatched pairs are TRL's: within each batch of B
rows, row i gets row i-1's completion (row 0 the last one's), so they have the same tokens as the batch,
padded to their own width. Each contender runs in its own process (so that its peak RSS is its own), in turn,
`--rounds` times with the order rotated each round; a process waits for the shared machine to be quiet and
is run again (at most 3 times) if other processes took more than 15% of the CPUs meanwhile (bench/synthetic.py).

"Ours" is pointwise_dpo.py's per-step work built from its own functions (pointwise_step below, made of
example_logps, targets, pointwise_loss, pointwise_metrics, step_metrics and, for the default, all_example_logps):
its training loop with --grad_accum 1, binary labels, --c 0, per-token mean log-probs (its default): one
forward of B rows, the loss, backward, clip, the step's one host sync, torch.optim.AdamW(fused=True) and its
constant (warm-up 0) LambdaLR schedule.

Made equal on purpose: the model (bench/synthetic.py's 20M Llama, one saved directory), fp32, batch 16
completions (pointwise_dpo.py's --batch_size default; 16 sequences as vs_trl.py's 8 pairs), no gradient
accumulation, constant learning rate, max_grad_norm 10, beta 0.1, no gradient checkpointing (TRL's default is
on, pointwise_dpo.py's off; `--gradient-checkpointing 1` turns it on for all), the same optimizer
(torch.optim.AdamW(fused=True), TRL's default "adamw_torch_fused" and pointwise_dpo.py's), the same token ids
(TRL's tokenisation is skipped: its _prepare_dataset is replaced by rows that already hold prompt_ids,
completion_ids and TRL's KL_completion_ids; each completion already ends with EOS), the same order (a
sequential sampler, which KTO requires anyway), the same labels. Left as TRL's default: its extra metrics
(KL estimate, entropy, mean logits) and their host syncs, desirable/undesirable weights 1. Reference log-probs
are precomputed for the completions that are trained on only, before the clock starts but inside the
whole-process time.
Data: synthetic.make_pairs's prompts and responses (prompt and completion 30-80 tokens each by default, the
completion ending with EOS); row i is (prompt_i, chosen_i) labelled true for even i and (prompt_i,
rejected_i) labelled false for odd i, so half are positive and every batch has B/2 of each.
The first `--warmup` steps of each process are not timed. Step time = time between the ends of consecutive
optimizer steps, so it includes collation and logging. Whole process = start-up, imports, loading, reference
log-probs and every step, warm-up included.

Parity: the losses differ, so they cannot agree step by step. What is compared, on the first batch (step 1,
the policy still equal to the reference): the policy's summed log-probs of the completions, averaged over the
positives and over the negatives (KTOTrainer's logps/chosen and logps/rejected; for ours, its per-token mean
log-probs times the completion lengths); and each step-1 loss against its closed form at u = 0 (KTO: 1 -
sigmoid(0) = 0.5 for both subsets, as the clamped KL estimate is 0; point-wise DPO: log 2 per subset, the two
subset means added, 2 log 2). Within a family (kto / kto-precompute, ours / ours-ref-model) the losses of every
step must agree.

Full measurement (on a quiet machine): 16 processes (4 contenders x 4 rounds) of 7 steps each; about 10 minutes,
an estimate from the check above (40 s a process on one busy core, 3 steps), not yet timed on a quiet machine:
    python bench/vs_kto.py --model 20M --rounds 4
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from synthetic import (PAD, VOCAB, build_model, load_model, make_pairs, median, n_params, peak_rss_mib, quietly,
                       rss_mib)

CONTENDERS = ["kto", "kto-precompute", "ours", "ours-ref-model"]
LENGTHS = {"equal": ((30, 80), (30, 80)), "short-prompt": ((10, 30), (60, 100)), "long-prompt": ((120, 200), (20, 60))}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M", choices=list(VOCAB), help="which synthetic model")
    parser.add_argument("--examples", type=int, default=1000, help="synthetic labelled completions in the data set")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per optimizer step (even)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=4, help="processes per contender, order rotated each round")
    parser.add_argument("--max-length", type=int, default=256, help="max prompt + completion tokens (none are longer)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="large enough that the loss moves")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--lengths", default="equal", choices=list(LENGTHS), help="prompt and completion lengths")
    parser.add_argument("--gradient-checkpointing", type=int, default=0, choices=[0, 1],
                        help="1: recompute activations in backward, in every contender (TRL's default, off here)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error("--batch-size must be even and at least 2 (KTO's KL estimate needs 2 rows; half are positive)")
    return args


def make_examples(args):
    """pointwise_dpo.py's rows (prompt_ids, completion_ids, z, positive): half positive, alternating."""
    pairs = make_pairs(VOCAB[args.model], args.examples, 0, *LENGTHS[args.lengths])
    return [(p, c if i % 2 == 0 else r, float(i % 2 == 0), i % 2 == 0) for i, (p, c, r) in enumerate(pairs)]


def rows_per_step(name, B):
    """(forward rows with grad, forward rows without, rows before training per trained example)."""
    return {"kto": (B, 3 * B, 0), "kto-precompute": (B, B, 2), "ours": (B, 0, 1), "ours-ref-model": (B, B, 0)}[name]


# ---------------------------------------------------------------- pointwise_dpo.py's step
def pointwise_step(policy, optimizer, scheduler, chunk, idx, ref, beta=0.1, c=0.0, max_grad_norm=10.0, average=True,
                   mark=lambda phase: None):
    """One optimizer step of pointwise_dpo.py's training loop with --grad_accum 1, binary labels, made of its own
    functions. `ref(chunk, idx)` gives the reference log-probs (precomputed or from a frozen model). `mark(phase)`
    is called at the end of "forward", "backward" and "step" (memory.py's timeline).
    Returns the step's metrics row and the policy's log-probs of the batch (for the parity check)."""
    import torch
    from pointwise_dpo import example_logps, pointwise_loss, pointwise_metrics, step_metrics, targets
    policy_logps = example_logps(policy, chunk, PAD, "cpu", average)  # (B,)
    reference = ref(chunk, idx)  # (B,)
    mark("forward")
    z, positive = targets(chunk, "cpu")  # (B,), (B,)
    loss, losses, rewards = pointwise_loss(policy_logps, reference, z, positive, beta, c, "binary", False)
    loss.backward()
    mark("backward")
    sums = pointwise_metrics(losses, rewards, policy_logps, z, positive, c)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    values = torch.stack([loss.detach().double(), grad_norm.double(), *[t for pair in sums.values() for t in pair]]).tolist()
    totals = {k: (values[2 + 2 * j], values[3 + 2 * j]) for j, k in enumerate(sums)}  # the step's one host sync
    row = {**step_metrics(totals), "loss": values[0], "grad_norm": values[1]}
    if not all(map(math.isfinite, values[:2])):
        raise SystemExit(f"non-finite loss or gradient ({row})")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    mark("step")
    return row, policy_logps.detach()


def run_ours(args, path, examples, with_ref_model):
    import torch
    from types import SimpleNamespace
    from pointwise_dpo import all_example_logps, example_logps
    policy = load_model(path)
    if with_ref_model:  # pointwise_dpo.py --ref_model
        reference = load_model(path).eval().requires_grad_(False)
        ref = lambda chunk, idx: example_logps(reference, chunk, PAD, "cpu", True)
    else:  # its default: every trained row's reference log-prob, computed once with the initial policy
        cache = all_example_logps(policy, examples, SimpleNamespace(batch_size=args.batch_size, logps="mean"), PAD, "cpu")
        ref = lambda chunk, idx: cache[list(idx)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0 + 1)))  # warm-up 0
    if args.gradient_checkpointing:  # as pointwise_dpo.py --gradient_checkpointing does it
        policy.activation_checkpointing_enable({"use_reentrant": False})
    policy.train()
    losses, ends, first = [], [time.perf_counter()], None
    B = args.batch_size
    for step in range(args.warmup + args.steps):
        idx = range(step * B, (step + 1) * B)
        chunk = [examples[i] for i in idx]
        row, policy_logps = pointwise_step(policy, optimizer, scheduler, chunk, idx, ref)
        losses.append(row["loss"])
        if first is None:  # summed log-probs = per-token means x completion lengths
            sums = [lp * len(r) for lp, (_, r, _, _) in zip(policy_logps.tolist(), chunk)]
            first = {k: sum(s for s, (_, _, _, pos) in zip(sums, chunk) if pos == want) / sum(pos == want for *_, pos in chunk)
                     for k, want in (("chosen", True), ("rejected", False))}
        ends.append(time.perf_counter())
    return losses, ends, first


def run_kto(args, path, examples, precompute):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    class Trainer(KTOTrainer):
        """KTOTrainer with our token ids as they are, in order, and the exact loss of each step kept."""
        losses = []

        def _prepare_dataset(self, dataset, *unused, **kwargs):
            return dataset  # already prompt_ids / completion_ids / KL_completion_ids / label

        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)  # KTOConfig's default strategy too

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, return_outputs)
            self.losses.append(loss.detach())
            return loss

    class Clock(TrainerCallback):
        ends, logs = [], []

        def on_train_begin(self, *unused, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *unused, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    B = args.batch_size
    completions = [r for _, r, _, _ in examples]
    # TRL's KL completions (KTOTrainer._prepare_dataset, add_kl_completion_ids): within each batch of B rows, the
    # completions rotated by one, (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})
    kl = [c for s in range(0, len(completions), B) for c in completions[s:s + B][-1:] + completions[s:s + B][:-1]]
    data = Dataset.from_dict({"prompt_ids": [p for p, _, _, _ in examples], "completion_ids": completions,
                              "KL_completion_ids": kl, "label": [pos for _, _, _, pos in examples]})
    policy = load_model(path)
    reference = None if precompute else load_model(path)
    config = KTOConfig(output_dir=tempfile.mkdtemp(prefix="kto-bench-"), per_device_train_batch_size=B,
                       gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=10.0, beta=0.1,
                       optim="adamw_torch_fused", bf16=False, fp16=False,
                       gradient_checkpointing=bool(args.gradient_checkpointing), max_length=args.max_length,
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=2 * B,
                       logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                       dataloader_num_workers=0, seed=0)
    clock = Clock()
    trainer = Trainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(path), callbacks=[clock])
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # TRL's output directory: nothing is saved there
    log = next(log for log in clock.logs if "logps/chosen" in log)
    return torch.stack(Trainer.losses).tolist(), clock.ends, {"chosen": log["logps/chosen"], "rejected": log["logps/rejected"]}


def child(args):
    """One contender in this process: print one JSON line with its step times, losses and peak RSS."""
    import torch
    if args.child.startswith("kto"):
        import trl  # noqa: F401  (what each contender imports counts towards its memory)
    else:
        import pointwise_dpo  # noqa: F401
    rss_imports = rss_mib()
    path = build_model(args.model)
    examples = make_examples(args)[:(args.warmup + args.steps) * args.batch_size]  # only those trained on
    run = {"kto": lambda: run_kto(args, path, examples, precompute=False),
           "kto-precompute": lambda: run_kto(args, path, examples, precompute=True),
           "ours": lambda: run_ours(args, path, examples, with_ref_model=False),
           "ours-ref-model": lambda: run_ours(args, path, examples, with_ref_model=True)}[args.child]
    losses, ends, first_logps = run()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    print(json.dumps(dict(contender=args.child, losses=losses, times=times, first_logps=first_logps,
                          peak_rss_mib=peak_rss_mib(), rss_after_imports_mib=rss_imports,
                          threads=torch.get_num_threads())))


def main():
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    path = build_model(args.model)
    examples = make_examples(args)
    tokens = [len(p) + len(r) for p, r, _, _ in examples]
    B, n_examples = args.batch_size, (args.warmup + args.steps) * args.batch_size
    print(f"model {args.model}: {n_params(load_model(path)) / 1e6:.1f}M parameters, vocab {VOCAB[args.model]}; "
          f"{len(examples)} labelled completions, half positive, {sum(tokens) / len(tokens):.0f} tokens per sequence "
          f"on average, prompt:completion {sum(len(p) for p, _, _, _ in examples) / sum(len(r) for _, r, _, _ in examples):.2f}; "
          f"batch {B} completions, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    contenders = args.contenders.split(",")
    results = {c: [] for c in contenders}
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for name in order:
            command = [sys.executable, os.path.abspath(__file__), "--child", name,
                       *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "contenders")]]
            def process():  # the whole process: start-up, loading, reference log-probs and the steps
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                return done, time.perf_counter() - start
            (out, wall), others = quietly(process)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name].append({**json.loads(out.stdout.strip().splitlines()[-1]), "others": others, "wall": wall})
            print(f"round {r + 1} {name:15s} median step {median(results[name][-1]['times']):.3f} s, whole process "
                  f"{wall:.1f} s, other processes used {others:.0%} of the CPUs meanwhile", flush=True)

    # parity: different losses, so the first batch's policy log-probs, and each step-1 loss against its closed form
    first = {c: results[c][0] for c in contenders}
    expected = {"kto": 0.5, "kto-precompute": 0.5, "ours": 2 * math.log(2), "ours-ref-model": 2 * math.log(2)}
    base = contenders[0]
    print(f"\nParity (round 1): mean summed policy log-probs of the first batch's positives and negatives (KTO's "
          f"logps/chosen and logps/rejected; ours: per-token means x completion lengths), step-1 loss against its "
          f"closed form at u = 0, and the largest loss difference within a family over all {args.warmup + args.steps} steps")
    print("| contender | logps/chosen step 1 | logps/rejected step 1 | loss step 1 | closed form | loss step 2 | "
          "max abs diff in family |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for c in contenders:
        family = [o for o in contenders if o.split("-")[0] == c.split("-")[0]]
        diff = max(abs(a - b) for o in family for a, b in zip(first[c]["losses"], first[o]["losses"]))
        lp = first[c]["first_logps"]
        ok &= abs(first[c]["losses"][0] - expected[c]) < 1e-4 and diff < 1e-4
        ok &= all(abs(lp[k] - first[base]["first_logps"][k]) < 1e-2 for k in lp)
        print(f"| {c} | {lp['chosen']:.4f} | {lp['rejected']:.4f} | {first[c]['losses'][0]:.6f} | {expected[c]:.6f} | "
              + (f"{first[c]['losses'][1]:.6f}" if len(first[c]["losses"]) > 1 else "-") + f" | {diff:.1e} |")
    print("parity: " + ("OK: log-probs agree within 1e-2 (summed over ~55 tokens), step-1 losses within 1e-4 of their "
                        "closed forms, losses within a family within 1e-4" if ok else "FAILED"))

    print(f"\n| contender | forward rows a step (grad + no grad) | rows before training | median step (s) | "
          f"examples/s | peak RSS (MiB) | examples/s vs {base} | peak RSS vs {base} | whole process (s) | "
          f"whole-process examples/s vs {base} | others' CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for c in contenders:
        step = median([t for run in results[c] for t in run["times"]])
        rss = max(run["peak_rss_mib"] for run in results[c])
        wall = median([run["wall"] for run in results[c]])
        summary[c] = (step, B / step, rss, wall, max(run["others"] for run in results[c]))
    ref = summary[base]
    for c, (step, rate, rss, wall, others) in summary.items():
        grad, no_grad, before = rows_per_step(c, B)
        print(f"| {c} | {grad + no_grad} ({grad} + {no_grad}) | {before * n_examples} | {step:.3f} | {rate:.2f} | "
              f"{rss:.0f} | {rate / ref[1]:.2f}x | {rss / ref[2]:.2f}x | {wall:.1f} | {ref[3] / wall:.2f}x | {others:.0%} |")
    for a, b in [("ours", "kto"), ("ours", "kto-precompute"), ("ours-ref-model", "kto")]:
        if a in summary and b in summary:
            print(f"{a} vs {b}: {summary[a][1] / summary[b][1]:.2f}x examples/s steady, "
                  f"{summary[b][3] / summary[a][3]:.2f}x whole process ({n_examples} examples), "
                  f"{summary[a][2] / summary[b][2]:.2f}x peak RSS")
    print("RSS right after imports (MiB): " + ", ".join(
        f"{c} {results[c][0]['rss_after_imports_mib']:.0f}" for c in contenders))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
