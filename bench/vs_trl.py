"""dpo.py against TRL's DPOTrainer, head to head: same weights, same token ids, same optimizer steps.

    python bench/vs_trl.py --model 20M --rounds 4                               # about 9 minutes on 2 CPU cores
    python bench/vs_trl.py --model 20M-128k --rounds 1 --warmup 1 --steps 5    # about 9 minutes (TRL: 30 s a step)

Five contenders, each in its own process (so that its peak RSS is its own), run in turn, `--rounds` times
with the order rotated each round; a process waits for the shared machine to be quiet and is run again
(at most 3 times) if other processes took more than 15% of the CPUs meanwhile:
    trl              DPOTrainer with a reference model (a second copy of the weights)
    trl-precompute   DPOTrainer(precompute_ref_log_probs=True)
    ours             dpo.py's default: reference log-probs precomputed with the initial policy
    ours-ref-model   dpo.py --ref_model: a frozen reference model
    ours-plain-adamw dpo.py's default with the plain torch.optim.AdamW (for-each-parameter; dpo.py before it
                     switched to the fused one), to show what the optimizer costs
    ours-separate    dpo.py's default with each response in a row of its own, its prompt copied (the layout
                     before common.grouped_logps), to show what computing each prompt once is worth
    ours-rows-longest dpo.py's default with rows as long as the step's longest pair (the packing before
                     common._pack chose the row length), to show what that choice is worth
    ideal            not a trainer: the forward and backward of the step's unique tokens only (each prompt
                     once, no padding, plain causal attention, no mask), as many tokens scored by the LM
                     head as the pairs' responses have, and the same optimizer step; the floor for any layout
--lengths sets the prompt and response lengths: equal (30-80 tokens each), short-prompt (prompt 10-30,
responses 60-100), long-prompt (prompt 120-200, responses 20-60, as in multi-turn dialogues such as HH).
"Ours" runs dpo.py's own per-step work (synthetic.dpo_step, made of dpo.py's pair_logps, dpo_loss, dpo_metrics
and all_pair_logps): one forward of 2B rows, the loss, backward, clip, the one host sync, and the step of
dpo.py's optimizer, torch.optim.AdamW(fused=True) (synthetic.dpo_optimizer).

Made equal on purpose: fp32, batch 8 pairs, no gradient accumulation, constant learning rate, max_grad_norm 10,
no gradient checkpointing (TRL's default is on, dpo.py's off; `--gradient-checkpointing 1` turns it on for
all), the same token ids (TRL's tokenisation is skipped, so BOS/EOS handling cannot differ; each response
already ends with EOS), the same order (TRL's random sampler is replaced by a sequential one), the same
optimizer (the fused AdamW, both one's default). Left as TRL's default: its extra metrics (entropy, token
accuracy, mean logits). Reference log-probs are precomputed for the pairs that are trained on only, before
the clock starts.
The first `--warmup` steps of each process are not timed. Step time = time between the ends of consecutive
optimizer steps, so it includes collation and logging.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from synthetic import (VOCAB, build_model, dpo_optimizer, dpo_step, frozen_reference, load_model, make_pairs, median,
                       n_params, peak_rss_mib, precomputed_reference, quietly, rss_mib)

CONTENDERS = ["trl", "trl-precompute", "ours", "ours-ref-model", "ours-plain-adamw", "ours-separate", "ours-rows-longest",
              "ideal"]
LENGTHS = {"equal": ((30, 80), (30, 80)), "short-prompt": ((10, 30), (60, 100)), "long-prompt": ((120, 200), (20, 60))}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="20M", choices=list(VOCAB), help="which synthetic model")
    parser.add_argument("--pairs", type=int, default=1000, help="synthetic preference pairs in the data set")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=4, help="processes per contender, order rotated each round")
    parser.add_argument("--max-length", type=int, default=256, help="max prompt + response tokens (none are longer)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="large enough that the loss moves")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    parser.add_argument("--lengths", default="equal", choices=list(LENGTHS), help="prompt and response lengths")
    parser.add_argument("--gradient-checkpointing", type=int, default=0, choices=[0, 1],
                        help="1: recompute activations in backward, in every contender (TRL's default, off here)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_ours(args, path, pairs, with_ref_model, fused=True, separate=False, rows_longest=False):
    if rows_longest:  # the packing before the row length was chosen: rows as long as the longest group
        import common
        pack = common._pack
        common._pack = lambda sizes, row_tokens=None: pack(sizes, row_tokens or max(sizes))
    policy = load_model(path)
    if separate:  # what common.grouped_logps does for a model that cannot take the shared layout
        policy._prompt_shared = False
    ref = frozen_reference(load_model(path)) if with_ref_model else precomputed_reference(policy, pairs, args.batch_size)
    optimizer = dpo_optimizer(policy, args.learning_rate, fused)
    if args.gradient_checkpointing:  # as dpo.py --gradient_checkpointing does it
        policy.activation_checkpointing_enable({"use_reentrant": False})
    policy.train()
    losses, ends, first_logps = [], [time.perf_counter()], None
    for step in range(args.warmup + args.steps):
        row = dpo_step(policy, optimizer, pairs[step * args.batch_size:(step + 1) * args.batch_size], ref)
        losses.append(row["loss"])
        first_logps = first_logps or row["logps/chosen"]
        ends.append(time.perf_counter())
    return losses, ends, first_logps


def run_ideal(args, path, pairs):
    """The step's unique tokens (each prompt once) cut into full rows as long as the longest pair, plain causal
    attention (no mask), the LM head on as many positions as the responses have tokens, AdamW: the floor."""
    import torch
    from common import sequence_logps
    policy = load_model(path).train()
    optimizer = dpo_optimizer(policy, args.learning_rate)
    losses, ends = [], [time.perf_counter()]
    for step in range(args.warmup + args.steps):
        chunk = pairs[step * args.batch_size:(step + 1) * args.batch_size]
        tokens = [t for p, c, r in chunk for t in p + c + r]
        T = max(len(p) + len(c) + len(r) for p, c, r in chunk)
        ids = torch.tensor(tokens + [0] * (-len(tokens) % T)).view(-1, T)  # (rows, T), every row full
        n = sum(len(c) + len(r) for _, c, r in chunk)  # as many scored positions as the responses have tokens
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), score_index=torch.arange(n),
                     labels=ids.flatten()[1:n + 1], response_of_token=torch.zeros(n, dtype=torch.long),
                     n_tokens=torch.tensor([n]))
        policy._plain_head = True  # Llama: no check needed
        loss = -sequence_logps(policy, batch)[0].sum() / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return losses, ends, None


def run_trl(args, path, pairs, precompute):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Trainer(DPOTrainer):
        """DPOTrainer with our token ids as they are, in order, and the exact loss of each step kept."""
        losses = []

        def _prepare_dataset(self, dataset, *unused, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)

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

    data = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                              "rejected_ids": [r for _, _, r in pairs]})
    policy = load_model(path)
    reference = None if precompute else load_model(path)
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=args.learning_rate,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=10.0, beta=0.1,
                       bf16=False, fp16=False, gradient_checkpointing=bool(args.gradient_checkpointing), max_length=args.max_length,
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=2 * args.batch_size,
                       logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                       dataloader_num_workers=0, seed=0)
    clock = Clock()
    trainer = Trainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(path), callbacks=[clock])
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # TRL's output directory: nothing is saved there
    first_logps = next(log["logps/chosen"] for log in clock.logs if "logps/chosen" in log)
    return torch.stack(Trainer.losses).tolist(), clock.ends, first_logps


def child(args):
    """One contender in this process: print one JSON line with its step times, losses and peak RSS."""
    import torch
    if args.child.startswith("trl"):
        import trl  # noqa: F401  (what each contender imports counts towards its memory)
    else:
        import dpo  # noqa: F401
    rss_imports = rss_mib()
    path = build_model(args.model)
    n_pairs = (args.warmup + args.steps) * args.batch_size
    pairs = make_pairs(VOCAB[args.model], args.pairs, 0, *LENGTHS[args.lengths])[:n_pairs]  # only those trained on
    run = {"trl": lambda: run_trl(args, path, pairs, precompute=False),
           "trl-precompute": lambda: run_trl(args, path, pairs, precompute=True),
           "ours": lambda: run_ours(args, path, pairs, with_ref_model=False),
           "ours-ref-model": lambda: run_ours(args, path, pairs, with_ref_model=True),
           "ours-plain-adamw": lambda: run_ours(args, path, pairs, with_ref_model=False, fused=False),
           "ours-separate": lambda: run_ours(args, path, pairs, with_ref_model=False, separate=True),
           "ours-rows-longest": lambda: run_ours(args, path, pairs, with_ref_model=False, rows_longest=True),
           "ideal": lambda: run_ideal(args, path, pairs)}[args.child]
    losses, ends, first_logps = run()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    print(json.dumps(dict(contender=args.child, losses=losses, times=times, first_logps_chosen=first_logps,
                          peak_rss_mib=peak_rss_mib(), rss_after_imports_mib=rss_imports,
                          threads=torch.get_num_threads())))


def main():
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    path = build_model(args.model)
    pairs = make_pairs(VOCAB[args.model], args.pairs, 0, *LENGTHS[args.lengths])
    tokens = [len(p) + len(r) for p, c, rj in pairs for r in (c, rj)]
    print(f"model {args.model}: {n_params(load_model(path)) / 1e6:.1f}M parameters, vocab {VOCAB[args.model]}; "
          f"{len(pairs)} pairs, {sum(tokens) / len(tokens):.0f} tokens per sequence on average, "
          f"prompt:response {sum(len(p) for p, _, _ in pairs) / sum(len(c) for _, c, _ in pairs):.2f}; "
          f"batch {args.batch_size} pairs, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
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
            print(f"round {r + 1} {name:15s} median step {median(results[name][-1]['times']):.3f} s, "
                  f"other processes used {others:.0%} of the CPUs meanwhile", flush=True)

    # parity first: the same loss at every step, and the same policy log-probs on the first batch
    first = {c: results[c][0] for c in contenders}
    base = contenders[0]
    print(f"\nParity with {base} (round 1): loss at steps 1-3, |difference| over all "
          f"{args.warmup + args.steps} steps, mean logps/chosen of the first batch")
    print("| contender | loss step 1 | loss step 2 | loss step 3 | max abs diff | logps/chosen step 1 |")
    print("|---|---|---|---|---|---|")
    ok = True
    for c in [c for c in contenders if c != "ideal"]:  # the ideal trains on something else
        diff = max(abs(a - b) for a, b in zip(first[c]["losses"], first[base]["losses"]))
        ok &= max(abs(a - b) for a, b in zip(first[c]["losses"][:3], first[base]["losses"][:3])) < 1e-4
        print(f"| {c} | " + " | ".join(f"{x:.6f}" for x in first[c]["losses"][:3]) +
              f" | {diff:.1e} | {first[c]['first_logps_chosen']:.4f} |")
    print("parity: " + ("OK, losses agree within 1e-4 over the first 3 steps" if ok else "FAILED (differ by > 1e-4)"))

    print(f"\n| contender | median step (s) | pairs/s | peak RSS (MiB) | pairs/s vs {contenders[0]} | "
          f"peak RSS vs {contenders[0]} | whole process (s) | whole-process pairs/s vs {contenders[0]} | others' CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    n_pairs = (args.warmup + args.steps) * args.batch_size
    for c in contenders:
        step = median([t for run in results[c] for t in run["times"]])
        rss = max(run["peak_rss_mib"] for run in results[c])
        wall = median([run["wall"] for run in results[c]])
        summary[c] = (step, args.batch_size / step, rss, wall, max(run["others"] for run in results[c]))
    ref = summary[contenders[0]]
    for c, (step, rate, rss, wall, others) in summary.items():
        print(f"| {c} | {step:.3f} | {rate:.2f} | {rss:.0f} | {rate / ref[1]:.2f}x | {rss / ref[2]:.2f}x | {wall:.1f} | "
              f"{ref[3] / wall:.2f}x | {others:.0%} |")
    for a, b in [("ours", "trl-precompute"), ("ours", "ours-separate"), ("ours", "ours-rows-longest"), ("ideal", "ours")]:
        if a in summary and b in summary:
            print(f"{a} vs {b}: {summary[a][1] / summary[b][1]:.2f}x pairs/s steady, "
                  f"{summary[b][3] / summary[a][3]:.2f}x whole process ({n_pairs} pairs), "
                  f"{summary[a][2] / summary[b][2]:.2f}x peak RSS")
    print(f"RSS right after imports (MiB): " + ", ".join(
        f"{c} {results[c][0]['rss_after_imports_mib']:.0f}" for c in contenders))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
