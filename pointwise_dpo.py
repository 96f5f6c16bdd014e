"""Point-wise DPO and ULMA: Unified Language Model Alignment with Human Demonstration and Point-wise Preference.
Cai, Song, Jiang, Teng, Gu, Zhang. arXiv 2312.02554 (2023). https://arxiv.org/abs/2312.02554

    u           = log pi(y|x) - log pi_ref(y|x)          (per-token means by default, as in the authors' code)
    binary:     L = - E[ z log sigmoid(beta u + c) + (1 - z) log sigmoid(-(beta u + c)) ]        z in {0, 1}
    continuous: L =   E[ (z - beta u - c)^2 ]                                                    z a score
    ULMA:       L = - E_{z=1}[ log pi(y|x) ]  +  the point-wise term on every other row           (--ulma)
Pairwise DPO's beta log Z(x) cancels between y_w and y_l; point-wise it does not, and like the authors' code we
replace it by one constant c (--c, default 0). ULMA drops the reference from the positives: plain SFT on them.

Data (--dataset, --eval_dataset): TRL's unpaired format {"prompt", "completion", "label": true/false}; a score
column for --loss_type continuous (--label_column score, any finite number); pairs {"prompt", "chosen",
"rejected"} (or TRL's implicit prompt), read as (chosen, z = 1) and (rejected, z = 0); rows {"prompt",
"completion"} without the label column, and every row of --sft_dataset, are demonstrations: positives, z = 1.
Text or chat messages; a local .jsonl/.json/.parquet file, a save_to_disk folder or a hub dataset.
Scores become targets by standardising: z = (score - mean) / std, the mean and std of --dataset's scores (so
c = 0 says an average response keeps its probability, and beta sets the scale as in binary mode);
--raw_scores takes the scores as they are.

Run:
    python pointwise_dpo.py                                  # the toy task's labelled completions, CPU, about two minutes
    python pointwise_dpo.py --loss_type continuous --label_column score      # the toy's gold reward as the score
    python pointwise_dpo.py --ulma                           # ULMA on the toy: SFT on the positives
    python pointwise_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/kto-mix-14k --output_dir out
    python pointwise_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset negatives.jsonl --sft_dataset demos.jsonl \\
        --ulma --output_dir out
    python pointwise_dpo.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 pointwise_dpo.py --model meta-llama/Llama-3.1-8B-Instruct --dataset trl-lib/kto-mix-14k --output_dir out
Under torchrun each process takes --batch_size x --grad_accum rows of every step (a step is that many times the
number of processes; the two subsets' means are over the whole micro-batch, all processes' rows); --ddp keeps a
whole copy of the model on each GPU, --fsdp shards it (PyTorch's FSDP2; the default from 1B parameters). Only
rank 0 prints and writes. A run owns its --output_dir and resumes exactly, under the same number of processes,
as dpo.py's (see its docstring).

Deviations from the paper and the authors' code (Unified-Language-Model-Alignment/src, ulma/trainer.py):
1. As dpo.py: the reference log-probs are computed once, before training, with the initial policy; --ref_model
   loads a frozen reference instead. The authors fine-tune LoRA adapters and use the base model as reference.
2. As the authors' code: the positives and the other rows of a micro-batch are averaged separately and the two
   means added (an empty subset adds 0), so each subset weighs the same whatever its size; the paper writes E
   over all of D. On a (chosen 1, rejected 0) pair with c = 0 this gives -log s(beta u_w) - log s(-beta u_l).
3. Positives are rows labelled true and demonstrations. In continuous mode every scored row gets the squared
   loss and only demonstrations are positives (they get -log sigmoid(beta u + c), or SFT with --ulma); the
   authors' code treats a score of exactly 1.0 as a positive.
4. Scores are standardised (see above); the authors use them as given.
5. Per-token mean log-probs, as the authors' code (--logps sum for sums, as dpo.py).
6. rewards/positive and rewards/negative are beta u, as in TRL (the authors log sigmoid(beta u)); "positive"
   there means labelled true, a demonstration, or a target z > 0. rewards/accuracies is the accuracy of
   sign(beta u + c) as a classifier of positive against negative, a tie (beta u + c = 0) counting 1/2: 0.5 at step 0.
7. AdamW, linear warm-up then constant, full fine-tuning (authors: AdamW, cosine, lr 1e-5, LoRA r = 8, 3 epochs).
8. The held-out rows (--eval_fraction) are a seeded random subset of --dataset's rows, so a held-out row can
   share its prompt with a training row.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (agree, check_rows, clip_grad_norm_, crash_point, encode_prompt, encode_response, fingerprint,
                    full_state, gather_objects, gather_shares, grouped_logps, init_distributed, is_main, load_model,
                    load_optimizer_state, load_rows, load_tokenizer, mean_over_ranks, my_share, on_rank_0, parallelize,
                    prompt_head_length, read_json_rows, report_dropped, sync_gradients, this_rank, truncate, where,
                    world_size)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "policy to train: hub id or local directory (default: the built-in toy model)"})
    ref_model: str = field(default=None, metadata={"help": "frozen reference model; default: reference log-probs precomputed with the initial policy"})
    dataset: str = field(default=None, metadata={"help": "prompt/completion/label rows, pairs, or demonstrations (see the docstring): hub name, .jsonl/.json/.parquet, or a save_to_disk folder (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out data in the same formats; default: hold out --eval_fraction of --dataset"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset held out when no --eval_dataset is given"})
    max_eval_examples: int = field(default=1024, metadata={"help": "at most this many held-out rows are evaluated"})
    sft_dataset: str = field(default=None, metadata={"help": "demonstrations (prompt/completion; any label ignored), added to the training rows as positives"})
    label_column: str = field(default="label", metadata={"help": "the column of the labels: true/false (binary) or a number (continuous)"})
    loss_type: str = field(default="binary", metadata={"help": "binary labels (logistic loss) or continuous scores (squared loss)",
                                                       "choices": ["binary", "continuous"]})
    ulma: bool = field(default=False, metadata={"help": "ULMA: SFT (no reference) on positives and demonstrations, the point-wise loss on the rest"})
    c: float = field(default=0.0, metadata={"help": "the constant that stands for beta log Z(x) (authors: 0)"})
    raw_scores: bool = field(default=False, metadata={"help": "continuous mode: use the scores as targets as they are, not standardised"})
    logps: str = field(default="mean", metadata={"help": "per-token mean (the authors') or sum of the response log-probs",
                                                 "choices": ["mean", "sum"]})
    output_dir: str = field(default=None, metadata={"help": "where checkpoints and metrics go (default: runs/pointwise_dpo-<time>)"})
    max_steps: int = field(default=None, metadata={"help": "optimizer steps (default: --epochs over the data)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training rows, when --max_steps is not given"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch (one forward pass)"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (authors: 1e-5 with LoRA)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (the authors') or rmsprop", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (paper and authors' code: 0.1)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt's middle is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of everything random"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the held-out rows every N steps"})
    save_every: int = field(default=500, metadata={"help": "write a checkpoint every N steps"})
    toy_eval_every: int = field(default=0, metadata={"help": "toy task only: every N steps also sample the test prompts and "
                                                             "log gold reward, length and KL, a training curve (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its newest checkpoint"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU",
                                                 "choices": ["auto", "float32", "bfloat16", "float16"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    ddp: bool = field(default=False, metadata={"help": "under torchrun: a full copy of the model a process (default below 1B parameters)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: the model sharded over the processes with FSDP2 (default from 1B parameters)"})


# The toy task needs a larger step size and smaller batches than a pretrained LLM; used when --model is not given.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=32, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, eval_fraction=0.1)
positive, at_least_1 = (lambda v: 0 < v < math.inf, "a positive number"), (lambda v: v >= 1, "at least 1")
ARG_CHECKS = dict(batch_size=at_least_1, grad_accum=at_least_1, epochs=at_least_1, eval_every=at_least_1,
                  save_every=at_least_1, max_eval_examples=at_least_1, max_length=(lambda v: v >= 2, "at least 2"),
                  max_steps=(lambda v: v is None or v >= 1, "at least 1"),
                  max_prompt_length=(lambda v: v is None or v >= 1, "at least 1"),
                  toy_eval_every=(lambda v: v >= 0, "0 or more"),
                  warmup_steps=(lambda v: v >= 0, "0 or more"), weight_decay=(lambda v: 0 <= v < math.inf, "0 or more"),
                  learning_rate=positive, beta=positive, max_grad_norm=positive,
                  eval_fraction=(lambda v: 0 < v < 1, "between 0 and 1"), c=(math.isfinite, "a finite number"))
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "toy_eval_every")  # every other flag must match the run's


# ---------------------------------------------------------------- arguments (TRY NOT TO MODIFY)
def parse_args(argv=None):
    """Flags as given, over the toy's defaults when --model is not given, over Args' defaults; every value is
    checked here, before anything is read or written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = "" if f.default is None or f.type is bool else f" (default: {f.default}" + (
            f"; toy: {TOY_DEFAULTS[f.name]})" if f.name in TOY_DEFAULTS else ")")
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, choices=f.metadata.get("choices"))
        parser.add_argument(*flags, **kind, default=argparse.SUPPRESS, help=f.metadata["help"] + default)
    given = vars(parser.parse_args(argv))  # only the flags on the command line: an explicit one always wins
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    args = Args(**{**defaults, **(TOY_DEFAULTS if "model" not in given else {}), **given})
    for name, (ok, expected) in ARG_CHECKS.items():
        if not ok(getattr(args, name)):
            sys.exit(f"error: --{name} must be {expected} (got {getattr(args, name)})")
    if args.toy_eval_every and args.dataset:
        sys.exit("error: --toy_eval_every is for the built-in toy task (without --dataset)")
    if args.dataset and not args.model:
        sys.exit("error: --dataset needs --model (without --model, the built-in toy task runs on its own data)")
    if args.resume and not args.output_dir:
        sys.exit("error: --resume needs the --output_dir of the run to continue")
    return args


# ---------------------------------------------------------------- ALGO LOGIC: the loss
def pointwise_loss(policy_logps, reference_logps, z, positive, beta, c=0.0, loss_type="binary", ulma=False, counts=None):
    """Point-wise DPO (binary or continuous) or ULMA on one batch (arXiv 2312.02554): the batch loss (the mean over
    the positives plus the mean over the other rows, deviation 2), the per-row losses, and the rewards beta * u.
    Under torchrun a micro-batch is split over the processes: `counts` (2,) are then the numbers of positives and
    other rows in the whole of it, the means are over the whole, and the processes' losses average to its loss."""
    u = policy_logps - reference_logps  # (B,) log pi(y|x) - log pi_ref(y|x)
    logits = beta * u + c  # (B,) the implicit reward beta u + beta log Z(x), with c standing for beta log Z(x)
    if ulma:
        positive_losses = -policy_logps  # (B,) ULMA: SFT on positives, no reference, no KL term
    else:
        positive_losses = -F.logsigmoid(logits)  # (B,) point-wise DPO, binary, z = 1
    if loss_type == "continuous":
        other_losses = (z - logits) ** 2  # (B,) point-wise DPO, continuous: (z - beta u - c)^2
    else:
        other_losses = -F.logsigmoid(-logits)  # (B,) point-wise DPO, binary, z = 0: -log(1 - sigmoid(beta u + c))
    losses = torch.where(positive, positive_losses, other_losses)  # (B,)
    n_positive, n_other = (positive.sum(), (~positive).sum()) if counts is None else counts  # an empty subset adds 0
    share = 1 if counts is None else world_size()  # this process's part of the whole micro-batch: 1 / share
    loss = share * (losses.masked_fill(~positive, 0).sum() / n_positive.clamp(min=1)  # (deviation 2) masked, not
                    + losses.masked_fill(positive, 0).sum() / n_other.clamp(min=1))  # times 0: an inf stays in its subset
    return loss, losses, beta * u.detach()


def example_logps(model, examples, pad_token_id, device, average=True):
    """Log-probs of each row's response, per-token means (the authors') or sums, in one forward pass: (B,). Rows
    with the same prompt share one copy of it, and rows are packed without padding (common.grouped_logps)."""
    groups = {}  # prompt -> [(row, response)], the prompts in order of first appearance
    for i, (p, r, _, _) in enumerate(examples):
        groups.setdefault(tuple(p), []).append((i, r))
    logps, n_tokens = grouped_logps(model, [(list(p), [r for _, r in rows]) for p, rows in groups.items()],
                                    pad_token_id, device)  # (B,), (B,) in group order
    back = torch.tensor([i for rows in groups.values() for i, _ in rows], device=logps.device).argsort()
    logps, n_tokens = logps[back], n_tokens[back]  # in the rows' order
    return logps / n_tokens if average else logps  # (B,)


def targets(examples, device):
    """z (B,) float and positive (B,) bool of a batch."""
    return (torch.tensor([z for _, _, z, _ in examples], device=device),
            torch.tensor([p for _, _, _, p in examples], device=device))


def pointwise_metrics(losses, rewards, policy_logps, z, positive, c):
    """(sum, count) per metric, so that micro-batches and held-out chunks add up. "positive" in a metric's name
    means labelled true, a demonstration, or a target above 0 (deviation 6); the accuracy is that of
    sign(beta u + c) as a classifier of it, a tie counting 1/2. `_loss/...` are the two subsets' losses (the
    loss is the sum of their means)."""
    good = positive | (z > 0)  # (B,)
    correct = torch.where(rewards + c == 0, 0.5, (((rewards + c) > 0) == good).double())  # (B,) a tie: a coin flip
    logps = policy_logps.detach()
    sums = lambda values, mask: ((values * mask).sum().double(), mask.sum().double())
    return {"rewards/positive": sums(rewards, good), "rewards/negative": sums(rewards, ~good),
            "logps/positive": sums(logps, good), "logps/negative": sums(logps, ~good),
            "rewards/accuracies": sums(correct, torch.ones_like(good)),
            "_loss/positive": sums(losses.detach(), positive), "_loss/other": sums(losses.detach(), ~positive)}


# ---------------------------------------------------------------- data
def read_label(source, i, row, args):
    """(z, positive) of a labelled row; a label that does not fit --loss_type stops with its file, row and field."""
    value, at = row.get(args.label_column), f"error: {source}: {where(source, i)}: field '{args.label_column}'"
    if value is None and os.path.isfile(source) and source.lower().endswith((".json", ".jsonl")):
        value = read_json_rows(source)[i].get(args.label_column)  # what `datasets` read as null: NaN in a bool column
    if value is None:
        sys.exit(f"{at}: missing (other rows have a label; a file without any is read as demonstrations)")
    if args.loss_type == "binary":
        if not isinstance(value, bool):
            hint = "; for scores use --loss_type continuous" if isinstance(value, (int, float)) else ""
            sys.exit(f"{at}: expected true or false (--loss_type binary), got {type(value).__name__} {str(value)[:40]!r}{hint}")
        return float(value), value
    if isinstance(value, bool):
        sys.exit(f"{at}: a true/false label, but --loss_type continuous needs a number (a score); "
                 f"use --loss_type binary for labels")
    if not isinstance(value, (int, float)):
        sys.exit(f"{at}: expected a number (--loss_type continuous), got {type(value).__name__} {str(value)[:40]!r}")
    if not math.isfinite(value):
        sys.exit(f"{at}: expected a finite number, got {value}")
    return float(value), False


def load_examples(source, tokenizer, args, split="train", demonstrations=False):
    """Tokenised (prompt_ids, response_ids, z, positive) rows of one source, in any of the formats in the
    docstring; unusable rows are dropped and counted."""
    rows = load_rows(source, [], split)
    if not demonstrations and any(r.get("chosen") is not None or r.get("rejected") is not None for r in rows):
        if args.loss_type == "continuous":
            sys.exit(f"error: {source}: preference pairs (chosen/rejected) give binary labels; --loss_type "
                     f"continuous needs a score column (--label_column)")
        rows = check_rows(source, rows, ["prompt", "chosen", "rejected"])
        items = [(i, row["prompt"], row[k], float(k == "chosen"), k == "chosen")  # chosen -> 1, rejected -> 0
                 for i, row in enumerate(rows) for k in ("chosen", "rejected")]
    else:
        rows = check_rows(source, rows, ["prompt", "completion"])
        labelled = not demonstrations and any(r.get(args.label_column) is not None for r in rows)
        items = [(i, row["prompt"], row["completion"], *(read_label(source, i, row, args) if labelled else (1.0, True)))
                 for i, row in enumerate(rows)]
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "prompt alone longer than --max_length": []}
    examples, n_cut = [], 0
    for i, prompt, response, z, is_positive in tqdm(items, desc=f"tokenizing {source}", disable=len(items) < 10000):
        if not (text(prompt).strip() and text(response).strip()):
            dropped["empty prompt or response"].append(i + 1)
            continue
        prompt_ids = encode_prompt(tokenizer, prompt)
        if len(prompt_ids) >= args.max_length:
            dropped["prompt alone longer than --max_length"].append(i + 1)
            continue
        prompt_ids, (response_ids,), cut = truncate(prompt_ids, [encode_response(tokenizer, prompt, response)],
                                                    args.max_length, args.max_prompt_length,
                                                    prompt_head_length(tokenizer, prompt, prompt_ids))
        examples.append((prompt_ids, response_ids, z, is_positive))
        n_cut += cut
    report_dropped(source, dropped, len(items))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(examples)} rows to --max_length {args.max_length}")
    return examples


def load_data(args, tokenizer):
    """Training and held-out rows (--eval_dataset, or --eval_fraction of --dataset held out by a seeded shuffle),
    the demonstrations of --sft_dataset added to training; scores standardised; both label kinds required."""
    train = load_examples(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out = load_examples(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_examples, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    if args.sft_dataset:
        train += load_examples(args.sft_dataset, tokenizer, args, args.dataset_split, demonstrations=True)
    n_positive = sum(p for _, _, _, p in train)
    if args.loss_type == "continuous" and not args.raw_scores:  # z = (score - mean) / std of the training scores
        scores = torch.tensor([z for _, _, z, p in train if not p], dtype=torch.float64)
        if len(scores) < 2 or scores.std() == 0:
            sys.exit(f"error: {args.dataset}: --loss_type continuous needs scores that differ (found {len(scores)} "
                     f"scored rows{', all ' + str(scores[0].item()) if len(scores) else ''}); or pass --raw_scores")
        mean, std = scores.mean().item(), scores.std().item()
        standardise = lambda rows: [(p, r, z if pos else (z - mean) / std, pos) for p, r, z, pos in rows]
        train, held_out = standardise(train), standardise(held_out)
        print(f"scores standardised: z = (score - {mean:.4g}) / {std:.4g}")
    kinds = ("positives (label true, or demonstrations)",
             "negatives (label false)" if args.loss_type == "binary" else f"scored rows ('{args.label_column}')")
    for count, kind in ((n_positive, kinds[0]), (len(train) - n_positive, kinds[1])):
        if count == 0 and (args.loss_type == "binary" or kind == kinds[1]):
            sys.exit(f"error: {args.dataset}: no {kind} among the {len(train)} training rows; point-wise DPO needs "
                     f"both (rows without a '{args.label_column}' field are read as demonstrations, i.e. positives)")
    print(f"{len(train)} training rows ({n_positive} {kinds[0].split(' (')[0]}, {len(train) - n_positive} "
          f"{kinds[1].split(' (')[0]}), {len(held_out[:args.max_eval_examples])} held-out rows")
    return train, held_out[:args.max_eval_examples]


@torch.no_grad()
def all_example_logps(model, examples, args, pad_token_id, device, desc=None):
    """(N,) log-probs of every row's response, in eval mode. Under torchrun each rank computes its share and
    every rank gets the whole."""
    share, out, was_training = my_share(len(examples)), [torch.zeros(0)], model.training
    model.eval()
    for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=desc, disable=desc is None):
        chunk = [examples[i] for i in share[s:s + 2 * args.batch_size]]
        out.append(example_logps(model, chunk, pad_token_id, device, args.logps == "mean").cpu())
        crash_point("reference")
    model.train(was_training)
    return gather_shares(torch.cat(out), len(examples))


def reference_cache(args, policy, splits, record, pad_token_id, device):
    """Reference log-probs of every row under the initial policy (deviation 1), computed once and kept in the run
    directory with the record of what they were computed from, so a resumed run reuses them (and never reuses
    another run's)."""
    path = os.path.join(args.output_dir, "reference_logps.pt")
    fixed = {k: v for k, v in record["args"].items() if k not in RESUME_MAY_CHANGE}, record["inputs"]
    if os.path.exists(path):
        cache = torch.load(path)
        if cache["record"] != fixed:
            sys.exit(f"error: {path} was computed for other flags or inputs; remove it to compute it again")
        return cache
    cache = {name: all_example_logps(policy, examples, args, pad_token_id, device, "reference log-probs")
             for name, examples in splits.items()}
    if is_main():
        torch.save({**cache, "record": fixed}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def step_metrics(totals):
    """Means from (sum, count) totals: each metric over its rows, the loss as the sum of the two subsets' means."""
    row = {k: s / n for k, (s, n) in totals.items() if n and not k.startswith("_")}
    return {"loss": sum(s / n for k, (s, n) in totals.items() if n and k.startswith("_")), **row}


def evaluate(policy, examples, reference_logps, args, pad_token_id, device):
    """Point-wise metrics on the held-out rows, with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_example_logps(policy, examples, args, pad_token_id, device)  # (N,)
    z, positive = targets(examples, "cpu")
    _, losses, rewards = pointwise_loss(policy_logps, reference_logps, z, positive, args.beta, args.c, args.loss_type, args.ulma)
    metrics = pointwise_metrics(losses, rewards, policy_logps, z, positive, args.c)
    totals = {k: (total.item(), n.item()) for k, (total, n) in metrics.items()}
    return {f"eval_{k}": v for k, v in step_metrics(totals).items()}


# ---------------------------------------------------------------- the run directory (TRY NOT TO MODIFY)
def check_output_dir(args):
    """Refuse, before anything is loaded or written, a directory this run may not use: a file, a read-only
    place, another run's files without --resume, or --resume where no run is. Returns the newest checkpoint
    to resume from, or None (a run killed before its first checkpoint restarts from step 0)."""
    directory = args.output_dir
    if directory and os.path.exists(directory) and not os.path.isdir(directory):
        sys.exit(f"error: --output_dir {directory} is a file")
    parent = directory if directory and os.path.isdir(directory) else os.path.dirname(os.path.abspath(directory or "runs"))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        sys.exit(f"error: --output_dir {directory}: cannot write in {parent}")
    if args.resume:
        if not os.path.exists(os.path.join(directory, "args.json")):
            sys.exit(f"error: --resume: no run to continue in {directory} (no args.json)")
        checkpoints = list_checkpoints(directory)
        return checkpoints[-1] if checkpoints else None
    if directory and os.path.isdir(directory) and os.listdir(directory):
        sys.exit(f"error: --output_dir {directory} already holds files (another run?); pass --resume to continue "
                 f"it, or choose another --output_dir")
    return None


def run_record(args, tokenizer):
    """What the checkpoints and the reference cache depend on: every flag, and the content of every input."""
    inputs = {name: fingerprint(getattr(args, name)) for name in ("model", "ref_model", "dataset", "eval_dataset")}
    vocabulary = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, tokenizer.eos_token])
    inputs["tokenizer"] = hashlib.sha256(vocabulary.encode()).hexdigest()
    flags = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "resume")}  # not the run's
    flags["processes"] = world_size()  # torchrun's ranks: part of the batch, so a resume needs as many
    return {"args": flags, "inputs": inputs}


def check_resume(args, record):
    """A resumed run must have the flags and inputs of the run it continues, except RESUME_MAY_CHANGE."""
    path = os.path.join(args.output_dir, "args.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        sys.exit(f"error: {path}: not the record of a run ({e})")
    for section, values in record.items():
        for name, value in values.items():
            if name not in RESUME_MAY_CHANGE and saved.get(section, {}).get(name) != value:
                what = "the number of processes" if name == "processes" else f"--{name}" if section == "args" else f"the content of --{name}"
                sys.exit(f"error: --resume: {what} differs from the run in {args.output_dir} ({saved.get(section, {}).get(name)!r} "
                         f"there, {value!r} here); a resumed run may change only --{', --'.join(RESUME_MAY_CHANGE)}")


def claim_output_dir(args, record):
    """Make the directory this run's alone: args.json is linked into place, which fails if another run got there
    first (then the default name takes a suffix; an explicit --output_dir is an error)."""
    base = args.output_dir or time.strftime(f"runs/{os.path.basename(__file__)[:-3]}-%Y%m%d-%H%M%S")
    for n in range(1000):
        directory = base if n == 0 else f"{base}-{n}"
        try:
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".args-{os.getpid()}.json")
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
            try:
                os.link(tmp, os.path.join(directory, "args.json"))  # atomic, and fails if the file exists
            finally:
                os.remove(tmp)
            args.output_dir = directory
            return directory
        except FileExistsError:
            if args.output_dir:
                sys.exit(f"error: --output_dir {directory} was just taken by another run; choose another --output_dir")
        except OSError as e:
            sys.exit(f"error: --output_dir {directory}: {e}")


# ---------------------------------------------------------------- checkpoints and metrics (TRY NOT TO MODIFY)
def save_checkpoint(directory, policy, tokenizer, optimizer, scheduler, step):
    """Write checkpoint-<step> into a temporary directory, then rename it, then delete the older ones: a kill at
    any instant leaves at least one complete checkpoint."""
    final = os.path.join(directory, f"checkpoint-{step}")
    if os.path.exists(final):
        return final
    model_state, optimizer_state = full_state(policy, optimizer)  # under torchrun: gathered on rank 0
    rng = gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),  # every rank's
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if not is_main():
        return final
    tmp = os.path.join(directory, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=model_state)  # safetensors
    tokenizer.save_pretrained(tmp)
    crash_point("checkpoint")
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "rng": rng}, os.path.join(tmp, "training_state.pt"))
    os.rename(tmp, final)
    for old in list_checkpoints(directory)[:-1]:  # keep only the newest
        shutil.rmtree(old)
    return final


def list_checkpoints(directory):
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-")] if os.path.isdir(directory) else []
    return [os.path.join(directory, d) for d in sorted(found, key=lambda d: int(d.split("-")[1]))]


def restore(checkpoint, policy, optimizer, scheduler):
    """Optimizer, scheduler and random state of a checkpoint (each rank's own); returns its step."""
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
    optimizer_state = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False) if is_main() else {}
    load_optimizer_state(policy, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][this_rank()]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    print(f"resuming from {checkpoint} at step {state['step']}")
    return state["step"]


def finished(directory, start_step, max_steps):
    """The final model is written last, and its config.json last of all: present means the run completed."""
    return start_step >= max_steps and os.path.exists(os.path.join(directory, "config.json"))


def save_final(directory, policy, tokenizer):
    """The final model in the output directory itself (so --model <output_dir> works), config.json last."""
    model_state, _ = full_state(policy)  # under torchrun: gathered on rank 0
    if not is_main():
        return
    tmp = os.path.join(directory, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    os.rmdir(tmp)
    print(f"saved the final model to {directory}")


def open_metrics(directory, start_step):
    """metrics.jsonl without what an interrupted run logged after its checkpoint; returns log(row), which puts
    each row on disk before it returns (under torchrun: rank 0's log; the others' does nothing)."""
    if not is_main():
        return lambda row: None
    path = os.path.join(directory, "metrics.jsonl")
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut short by a kill
                    row = json.loads(line)
                    kept += [line] if row["step"] <= start_step and "toy/gold_reward_after" not in row else []
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    metrics_file = open(path, "a")

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
    return log


def stop(message, directory):
    last = list_checkpoints(directory)
    raise SystemExit(f"error: {message}; stopping. Last good checkpoint: {last[-1] if last else 'none'}")


@contextlib.contextmanager
def interrupts(resume_command):
    """SIGINT (Ctrl-C) and SIGTERM: while `stop_after_step` is set, ask the loop to stop after this step
    (`requested`); otherwise, or a second time, stop at once. Either way the last line says how to continue."""
    state = {"stop_after_step": False, "requested": None}

    def handler(signum, frame):
        if state["stop_after_step"] and not state["requested"]:
            state["requested"] = signum
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")
        else:
            raise KeyboardInterrupt
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    except KeyboardInterrupt:
        sys.exit(f"interrupted. {resume_command() or 'Nothing was written.'}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(args, argv):
    """'Continue with: <the command line that continues this run>', or None before the run has its directory."""
    if not args.output_dir or not os.path.exists(os.path.join(args.output_dir, "args.json")):
        return None
    command = [sys.argv[0], *sys.argv[1:]] if argv is None else [os.path.basename(__file__), *argv]
    command += [] if any(a.startswith(("--output_dir", "--output-dir")) for a in command) else ["--output_dir", args.output_dir]
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if world_size() > 1 else ["python"]
    return "Continue with: " + shlex.join(launcher + command + ([] if "--resume" in command else ["--resume"]))


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    rank, world, device = init_distributed(args)  # (0, 1, "cuda" or "cpu") unless under torchrun
    checkpoint = on_rank_0(check_output_dir, args)  # reads only
    with interrupts(lambda: resume_command(args, argv)) as signals:
        toy = None
        if args.model is None:  # the built-in toy task: its labelled completions, 'label' and 'score' columns
            import toy
            toy_dir = toy.ensure_built()
            args.model, args.dataset = os.path.join(toy_dir, "sft"), os.path.join(toy_dir, "unpaired.jsonl")
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        train, held_out = load_data(args, tokenizer)
        rows_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
        steps_per_epoch = len(train) // rows_per_step
        if steps_per_epoch == 0:
            sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                     f"{rows_per_step} rows per step, but {args.dataset} gives only {len(train)} training rows")
        max_steps = args.max_steps or args.epochs * steps_per_epoch
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer)
        record["inputs"]["sft_dataset"] = fingerprint(args.sft_dataset)
        if args.resume:
            check_resume(args, record)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        policy = load_model(checkpoint or args.model, args.dtype, device, args.trust_remote_code)
        if args.gradient_checkpointing:
            enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # the name since transformers 5.x; the old one before
        parallel = parallelize(policy, args)  # under torchrun: DDP or FSDP2; else nothing
        reference = load_model(args.ref_model, args.dtype, device, args.trust_remote_code) if args.ref_model else None
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record)
        if parallel:
            print(f"{world} processes, {parallel.upper()}: {args.batch_size * args.grad_accum} rows a process a step")

        # the reference: a frozen model, or log-probs precomputed with the initial policy and kept with the run
        average = args.logps == "mean"
        if reference is not None:
            reference.eval().requires_grad_(False)
            parallelize(reference, args, trainable=False)
            ref = lambda chunk, idx, split: example_logps(reference, chunk, tokenizer.pad_token_id, device, average)
            held_out_ref = all_example_logps(reference, held_out, args, tokenizer.pad_token_id, device)
        else:
            if checkpoint and not os.path.exists(os.path.join(args.output_dir, "reference_logps.pt")):
                sys.exit(f"error: {args.output_dir} has checkpoints but no reference_logps.pt; it cannot be resumed")
            cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, tokenizer.pad_token_id, device)
            ref = lambda chunk, idx, split: cache[split][idx].to(device)
            held_out_ref = cache["eval"]

        # optimizer, linear warm-up then constant
        if args.optimizer == "adamw":
            optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                          fused=True)  # one kernel per step (see dpo.py)
        else:
            optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
        start_step = restore(checkpoint, policy, optimizer, scheduler) if checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return

        if toy:  # the toy's gold reward, length and KL of samples before training
            toy_reference = load_model(args.ref_model or args.model, args.dtype, device).eval()
            toy_prompts = toy.test_prompts(toy_dir)
            before = toy.evaluate(toy_reference, toy_reference, tokenizer, toy_prompts, seed=args.seed)

        # ---------------------------------------------------------------- the training loop
        log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
        if start_step == 0:
            log({"step": 0, **evaluate(policy, held_out, held_out_ref, args, tokenizer.pad_token_id, device)})
        policy.train()
        signals["stop_after_step"] = True  # from here Ctrl-C / SIGTERM finish the step and save first
        save_seconds = 3 * sum(p.numel() * p.element_size() for p in policy.parameters()) / 2e8  # a guess at 200 MB/s
        bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="pointwise_dpo")
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            everyone = order[position * rows_per_step:(position + 1) * rows_per_step].tolist()
            indices = everyone[rank::world]
            sums, loss = {}, 0.0
            for micro in range(args.grad_accum):
                idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
                sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
                chunk = [train[i] for i in idx]
                whole = everyone[micro * args.batch_size * world:(micro + 1) * args.batch_size * world]  # all ranks' idx
                n_positive = sum(train[i][3] for i in whole)
                counts = torch.tensor([n_positive, len(whole) - n_positive], device=device)  # of the whole micro-batch
                policy_logps = example_logps(policy, chunk, tokenizer.pad_token_id, device, average)  # (B,)
                reference_logps_ = ref(chunk, idx, "train")  # (B,)
                z, positive = targets(chunk, device)  # (B,), (B,)
                micro_loss, losses, rewards = pointwise_loss(policy_logps, reference_logps_, z, positive, args.beta,
                                                             args.c, args.loss_type, args.ulma, counts)
                (micro_loss / args.grad_accum).backward()
                loss = loss + micro_loss.detach() / args.grad_accum
                for k, (total, n) in pointwise_metrics(losses, rewards, policy_logps, z, positive, args.c).items():
                    sums[k] = (sums.get(k, (0, 0))[0] + total, sums.get(k, (0, 0))[1] + n)
            grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
            values = torch.stack([loss.double(), grad_norm.double(), *[t for pair in sums.values() for t in pair]])
            values = mean_over_ranks(values).tolist()  # the step's one host sync; a mean of (sum, count): same ratios
            totals = {k: (values[2 + 2 * j], values[3 + 2 * j]) for j, k in enumerate(sums)}
            row = {**step_metrics(totals), "loss": values[0], "grad_norm": values[1]}  # loss: the micro-batches' mean
            if not all(map(math.isfinite, values[:2])):
                stop(f"non-finite loss or gradient at step {step + 1} ({row})", args.output_dir)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            crash_point("step")
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == max_steps:
                row.update(evaluate(policy, held_out, held_out_ref, args, tokenizer.pad_token_id, device))
                tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, classifier accuracy "
                           f"{row['eval_rewards/accuracies']:.3f}, rewards {row.get('eval_rewards/positive', math.nan):+.3f} "
                           f"(positive) {row.get('eval_rewards/negative', math.nan):+.3f} (negative)")
            if toy and args.toy_eval_every and (step + 1) % args.toy_eval_every == 0 and step + 1 < max_steps:
                row.update({f"toy/{k}": v for k, v in toy.evaluate(policy, toy_reference, tokenizer, toy_prompts,
                                                                      seed=args.seed).items()})
            log(row)
            requested, slow_save = agree(signals["requested"] or 0, save_seconds >= 10)  # the same on every rank
            if (step + 1) % args.save_every == 0 or step + 1 == max_steps or requested and not slow_save:
                started = time.time()
                save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step + 1)
                save_seconds = time.time() - started
            if requested:
                bar.close()
                print(f"stopped after step {step + 1}; newest checkpoint: "
                      f"{(list_checkpoints(args.output_dir) or ['none (a resume starts at step 0)'])[-1]}. "
                      f"{resume_command(args, argv) or ''}", file=sys.stderr)
                raise SystemExit(128 + int(requested))
        signals["stop_after_step"] = False

        if toy:
            after = toy.evaluate(policy, toy_reference, tokenizer, toy_prompts, seed=args.seed)
            log({"step": max_steps, **{f"toy/{k}_before": v for k, v in before.items()},
                 **{f"toy/{k}_after": v for k, v in after.items()}})
            print(f"toy task, {len(toy_prompts)} test prompts, one sample each:\n"
                  f"  gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}   "
                  f"length {before['length']:.1f} -> {after['length']:.1f} words   "
                  f"KL(policy || reference) {before['kl']:.2f} -> {after['kl']:.2f} nats")
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


if __name__ == "__main__":
    main()
