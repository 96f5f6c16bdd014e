"""Point-wise DPO and ULMA: Unified Language Model Alignment with Human Demonstration and Point-wise Preference.
Cai, Song, Jiang, Teng, Gu, Zhang. 2023. https://arxiv.org/abs/2312.02554  Its page: docs/pointwise_dpo.md

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
    python pointwise_dpo.py                                # the toy task's labelled completions, CPU, about two minutes
    python pointwise_dpo.py --loss_type continuous --label_column score      # the toy's gold reward as the score
    python pointwise_dpo.py --ulma                         # ULMA on the toy: SFT on the positives
    python pointwise_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/kto-mix-14k --output_dir out
    python pointwise_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset negatives.jsonl --sft_dataset demos.jsonl \\
        --ulma --output_dir out
    python pointwise_dpo.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 pointwise_dpo.py --model meta-llama/Llama-3.1-8B-Instruct \\
        --dataset trl-lib/kto-mix-14k --output_dir out
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
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (AT_LEAST_1, RunArgs, check_resume, check_rows, claim_output_dir, crash_point, encode_prompt,
                    encode_response, end_of_step, finished, gather_shares, grouped_logps, load_model, load_policy,
                    load_rows, load_tokenizer, make_optimizer, my_share, on_rank_0, open_metrics, parallelize,
                    parse_flags, prompt_head_length, read_json_rows, reference_cache, report_dropped, restore,
                    run_record, save_checkpoint, save_final, start_run, steps_of, sync_gradients, toy_after,
                    toy_before, toy_task, training_bar, truncate, update, where, world_size)


@dataclass
class Args(RunArgs):  # the flags every script has (common.RunArgs; two redefined), then its own
    dataset: str = field(default=None, metadata={"help": "prompt/completion/label rows, pairs, or demonstrations (see "
                                                 "the docstring): hub name, .jsonl/.json/.parquet, or a save_to_disk "
                                                 "folder (default: toy)"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch (one forward pass)"})
    max_eval_examples: int = field(default=1024, metadata={"help": "at most this many held-out rows are evaluated"})
    sft_dataset: str = field(default=None, metadata={"help": "demonstrations (prompt/completion; any label ignored), "
                                                     "added to the training rows as positives"})
    label_column: str = field(default="label", metadata={"help": "the column of the labels: true/false (binary) or a "
                                                         "number (continuous)"})
    loss_type: str = field(default="binary", metadata={"help": "binary labels (logistic loss) or continuous scores "
                                                       "(squared loss)", "choices": ["binary", "continuous"]})
    ulma: bool = field(default=False, metadata={"help": "ULMA: SFT (no reference) on positives and demonstrations, the "
                                                "point-wise loss on the rest"})
    c: float = field(default=0.0, metadata={"help": "the constant that stands for beta log Z(x) (authors: 0)"})
    raw_scores: bool = field(default=False, metadata={"help": "continuous mode: use the scores as targets as they are, "
                                                      "not standardised"})
    logps: str = field(default="mean", metadata={"help": "per-token mean (the authors') or sum of the response "
                                                 "log-probs", "choices": ["mean", "sum"]})


# The toy task needs a larger step size and smaller batches than a pretrained LLM; used when --model is not given.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=32, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, eval_fraction=0.1)
ARG_CHECKS = dict(max_eval_examples=AT_LEAST_1, c=(math.isfinite, "a finite number"))


def parse_args(argv=None):
    """The flags, over the toy's defaults when --model is not given, each one checked (common.parse_flags)."""
    return parse_flags(Args, TOY_DEFAULTS, ARG_CHECKS, argv, __doc__.split("\n")[0])


# ---------------------------------------------------------------- ALGO LOGIC: the loss
def pointwise_loss(policy_logps, reference_logps, z, positive, beta, c=0.0, loss_type="binary", ulma=False,
                   counts=None):
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
                    + losses.masked_fill(positive, 0).sum() / n_other.clamp(min=1))  # times 0: an inf stays in it
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


def step_metrics(totals):
    """Means from (sum, count) totals: each metric over its rows, the loss as the sum of the two subsets' means."""
    row = {k: s / n for k, (s, n) in totals.items() if n and not k.startswith("_")}
    return {"loss": sum(s / n for k, (s, n) in totals.items() if n and k.startswith("_")), **row}


def pointwise_step(policy, train, everyone, reference, args, run, pad_token_id):
    """One optimizer step's backward passes: --grad_accum micro-batches of --batch_size rows a process (`everyone`:
    all processes' rows), the loss averaged over the step; `reference(chunk, idx)` gives the rows' reference log-probs.
    Returns the step's loss and each metric's "<name> sum" and "<name> count" (for common.update)."""
    sums, loss = {}, 0.0
    for micro in range(args.grad_accum):
        idx = everyone[run.rank::run.world][micro * args.batch_size:(micro + 1) * args.batch_size]  # this process's
        sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
        chunk = [train[i] for i in idx]
        whole = everyone[micro * args.batch_size * run.world:(micro + 1) * args.batch_size * run.world]  # all ranks'
        n_positive = sum(train[i][3] for i in whole)
        counts = torch.tensor([n_positive, len(whole) - n_positive], device=run.device)  # of the whole micro-batch
        policy_logps = example_logps(policy, chunk, pad_token_id, run.device, args.logps == "mean")  # (B,)
        z, positive = targets(chunk, run.device)  # (B,), (B,)
        micro_loss, losses, rewards = pointwise_loss(policy_logps, reference(chunk, idx), z, positive, args.beta,
                                                     args.c, args.loss_type, args.ulma, counts)  # reference: (B,)
        (micro_loss / args.grad_accum).backward()
        loss = loss + micro_loss.detach() / args.grad_accum
        for k, (total, n) in pointwise_metrics(losses, rewards, policy_logps, z, positive, args.c).items():
            sums[f"{k} sum"], sums[f"{k} count"] = sums.get(f"{k} sum", 0) + total, sums.get(f"{k} count", 0) + n
    return {"loss": loss.double(), **sums}


def step_row(values):  # the step's row of common.update's means over the processes: each metric's mean, the loss
    totals = {k[:-4]: (v, values[k[:-4] + " count"]) for k, v in values.items() if k.endswith(" sum")}  # name -> (s, n)
    return {**step_metrics(totals), "loss": values["loss"], "grad_norm": values["grad_norm"]}


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
            sys.exit(f"{at}: expected true or false (--loss_type binary), got {type(value).__name__} "
                     f"{str(value)[:40]!r}{hint}")
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


# ---------------------------------------------------------------- the reference, and evaluation
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


def evaluate_rows(policy, examples, reference_logps, args, pad_token_id, device):
    """Point-wise metrics on the held-out rows, with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_example_logps(policy, examples, args, pad_token_id, device)  # (N,)
    z, positive = targets(examples, "cpu")
    _, losses, rewards = pointwise_loss(policy_logps, reference_logps, z, positive, args.beta, args.c,
                                        args.loss_type, args.ulma)
    metrics = pointwise_metrics(losses, rewards, policy_logps, z, positive, args.c)
    totals = {k: (total.item(), n.item()) for k, (total, n) in metrics.items()}
    return {f"eval_{k}": v for k, v in step_metrics(totals).items()}


def eval_summary(row):  # the line printed after each evaluation
    return (f"eval loss {row['eval_loss']:.4f}, classifier accuracy {row['eval_rewards/accuracies']:.3f}, rewards "
            f"{row.get('eval_rewards/positive', math.nan):+.3f} (positive) "
            f"{row.get('eval_rewards/negative', math.nan):+.3f} (negative)")


def references(args, run, policy, reference, train, held_out, record, pad_token_id):
    """The reference pi_ref: a frozen --ref_model (`reference`), or log-probs precomputed with the initial policy and
    kept with the run (deviation 1). Returns reference(chunk, idx) for training rows, and the held-out rows' (N,)."""
    if reference is not None:
        reference.eval().requires_grad_(False)
        parallelize(reference, args, trainable=False)
        return (lambda chunk, idx: example_logps(reference, chunk, pad_token_id, run.device, args.logps == "mean")), \
            all_example_logps(reference, held_out, args, pad_token_id, run.device)
    if run.checkpoint and not os.path.exists(os.path.join(args.output_dir, "reference_logps.pt")):
        sys.exit(f"error: {args.output_dir} has checkpoints but no reference_logps.pt; it cannot be resumed")
    cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, pad_token_id, run.device,
                            logps=all_example_logps)
    return (lambda chunk, idx: cache["train"][idx].to(run.device)), cache["eval"]


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    with start_run(args, argv, __file__) as run:  # torchrun, the output directory checked, Ctrl-C and SIGTERM
        toy, toy_dir = toy_task(args, "unpaired.jsonl", None)  # without --model: the toy's labelled completions
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        pad = tokenizer.pad_token_id
        train, held_out = load_data(args, tokenizer)
        steps_per_epoch, max_steps = steps_of(args, len(train), run.world, "rows")
        rows_per_step = args.batch_size * args.grad_accum * run.world  # each rank batch_size x grad_accum of them
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer, sft_dataset=args.sft_dataset)
        if args.resume:
            check_resume(args, record)
        policy, parallel = load_policy(run, run.checkpoint)
        reference = load_model(args.ref_model, args.dtype, run.device, args.trust_remote_code) if args.ref_model \
            else None
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record, "pointwise_dpo")
        if parallel:
            print(f"{run.world} processes, {parallel.upper()}: {rows_per_step // run.world} rows a process a step")
        reference_logps, held_out_ref = references(args, run, policy, reference, train, held_out, record, pad)
        optimizer, scheduler = make_optimizer(policy, args)
        start_step = restore(run.checkpoint, policy, optimizer, scheduler)[0] if run.checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return
        if toy:  # the toy's gold reward, length and KL of samples before training
            toy_reference = load_model(args.ref_model or args.model, args.dtype, run.device).eval()
            toy_prompts, before = toy_before(toy, toy_dir, toy_reference, tokenizer, args.seed)
        evaluate = lambda: evaluate_rows(policy, held_out, held_out_ref, args, pad, run.device)

        # ---------------------------------------------------------------- the training loop
        run.log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
        if start_step == 0:
            run.log({"step": 0, **evaluate()})
        policy.train()
        bar = training_bar(run, policy, start_step, max_steps, "pointwise_dpo")
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            everyone = order[position * rows_per_step:(position + 1) * rows_per_step].tolist()  # all ranks' rows
            sums = pointwise_step(policy, train, everyone, reference_logps, args, run, pad)
            row = step_row(update(run, policy, optimizer, scheduler, sums, step))  # clip, stop on NaN, the step
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                       learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            end_of_step(run, row, step, max_steps, bar, evaluate, describe=eval_summary,
                        save=lambda: save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler,
                                                     step + 1),
                        toy_curve=toy and (lambda: toy.evaluate(policy, toy_reference, tokenizer, toy_prompts,
                                                                seed=args.seed)))
        run.signals["stop_after_step"] = False
        if toy:
            toy_after(toy, toy_prompts, before, policy, toy_reference, tokenizer, args.seed, run.log, max_steps)
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


if __name__ == "__main__":
    main()
