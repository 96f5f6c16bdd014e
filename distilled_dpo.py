"""Distilled DPO: Robust Preference Optimization through Reward Model Distillation.
Fisch, Eisenstein, Zayats, Agarwal, Beirami, Nagpal, Shaw, Berant. TMLR 2025. https://arxiv.org/abs/2405.19316
(no public code)  Its page: docs/distilled_dpo.md

DPO's loss on one label per pair is minimised by implicit margins that grow without bound. Distillation instead
regresses the policy's implicit reward margin onto an explicit reward model's, a finite target:

    u(x, y)   = log pi(y|x) - log pi_ref(y|x)                     (summed over tokens)
    m         = beta * (u(x, y_1) - u(x, y_2))                    the implicit reward margin of a pair
    Delta_k   = r_k(x, y_1) - r_k(x, y_2)                         teacher k's margin, calibrated (below)
    distill:          L = E[ (Delta_1 - m)^2 ]                                        (one reward model, d-DPO)
    ensemble:         L = min_k E_batch[ (Delta_k - m)^2 ]                            (e-DPO, K reward models)
    pessimistic_dpo:  L = - E[ log sigmoid(m) ] + gamma * E_x KL(pi_ref || pi)        (p-DPO)
    dpo:              L = - E[ log sigmoid(m) ]                                        (the baseline, dpo.py's loss)
    KL(pi_ref || pi) = E_{y ~ pi_ref}[ log pi_ref(y|x) - log pi(y|x) ]   on samples drawn once from pi_ref
    teachers (Bradley-Terry):  L_RM = - E[ log sigmoid(r(x, y_w) - r(x, y_l)) ]

Three stages, each written once into --output_dir and skipped by --resume:
  1. teachers: --num_reward_models K reward models (AutoModelForSequenceClassification, one output, initialised
     from the policy's model or --reward_model_init), each on a bootstrap resample of the training pairs with a
     seed of its own, saved with save_pretrained in reward_model_<k>/ (a kill inside one retrains that one);
     or given ones (--reward_models a,b,...); or precomputed margins r(chosen) - r(rejected) (--margin_column c,...).
  2. margins.pt: every training and held-out pair's margin under every teacher, raw and calibrated; teachers.json
     with each teacher's held-out accuracy (on its out-of-bag pairs; on the held-out pairs).
  3. the policy: reference_logps.pt (and reference_samples.pt for the forward KL), then training as dpo.py.

Calibration (--calibration temperature, the default): teacher k's margins are divided by the temperature tau_k that
minimises -E log sigmoid(Delta / tau_k) on pairs it was not trained on (its out-of-bag pairs; a given teacher: all
training pairs), so sigmoid(Delta_k) is its calibrated probability that y_1 is preferred. Why: a Bradley-Terry
model's scale is set only by how far its training went (an overfit one has margins of +-10 or more), while the
target m = beta (u_1 - u_2) is in the same log-odds units as DPO's implicit reward: once calibrated, beta means
what it means in DPO, and the minimiser is the RLHF optimum pi_ref exp(r / beta) for the calibrated r. A teacher
that separates its held-out pairs is capped at a mean calibrated |Delta| of 10. --calibration standardize divides
by the standard deviation of the training margins (one std = one log-odd); none keeps them as they are.

Run:
    python distilled_dpo.py                    # toy task: 3 reward models, ensemble, annotator with length bias 1
    python distilled_dpo.py --objective dpo --length_bias 2       # the baseline on more biased labels
    python distilled_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --objective ensemble --num_reward_models 3 --rm_learning_rate 1e-5 --output_dir out
    python distilled_dpo.py --model M --dataset pairs.jsonl --objective ensemble --reward_models rm_a,rm_b,rm_c \\
        --output_dir out
    python distilled_dpo.py --model M --dataset scored_pairs.jsonl --objective distill --margin_column margin \\
        --output_dir out
    python distilled_dpo.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 distilled_dpo.py --model meta-llama/Llama-3.1-8B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --output_dir out
Under torchrun each process takes --batch_size x --grad_accum pairs of every step (a step is that many times the
number of processes), for the reward models and for the policy; the margins, the reference log-probs and the
reference samples are computed each process its share; --ddp keeps a whole copy of each model on each GPU,
--fsdp shards it (PyTorch's FSDP2; the default from 1B parameters). Only rank 0 prints and writes. A run owns
its --output_dir and resumes exactly, under the same number of processes, as dpo.py's (see its docstring).

On the toy task the training pairs are the toy's, relabelled by an annotator that adds --length_bias reward per
10 words of extra length (toy.relabelled_pairs, seeded by --seed); the held-out pairs keep the toy's unbiased labels.

Deviations from the paper (whose exact losses and settings we could not read; see the notes in each item):
1. The ensemble takes the min over teachers of each micro-batch's mean squared loss (--ensemble_min batch): the
   theory's min is over the whole objective, which SGD cannot see; per batch is the closest reading that keeps one
   teacher per gradient. --ensemble_min example takes the min per pair (a larger, product family of rewards).
2. The family is K Bradley-Terry models on bootstrap resamples with distinct seeds; the paper's recipe is not known.
   A family trained on the same biased labels shares their bias: pessimism over it cannot remove that bias.
3. The forward KL of pessimistic_dpo is estimated on --kl_samples pure samples per training prompt from the
   reference, drawn once before training; each micro-batch uses its prompts' samples. gamma > 0 may be added to
   distill and ensemble too; the paper's exact forms and gamma are not known (default gamma 0.1).
4. Margins are calibrated (see above); the teachers read every pair as dpo.py tokenises it, with their own tokenizer.
5. As dpo.py: reference log-probs precomputed once; each pair's prompt computed once (common.grouped_logps);
   AdamW, linear warm-up then constant. The held-out metrics are the objective's pair loss without the KL term.
"""
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (AT_LEAST_1, OPTIONAL_AT_LEAST_1, POSITIVE, all_pair_logps, cached, check_resume,
                    check_reward_model, claim_output_dir, clip_grad_norm_, collate, crash_point, encode_prompt,
                    encode_response, end_of_step, finished, flag, from_pretrained, frozen, full_state, gather_shares,
                    grouped_scores, is_main, load_model, load_pairs, load_policy, load_reward_model, load_rows,
                    load_tokenizer, make_optimizer, mean_over_ranks, my_share, on_rank_0, open_metrics, pair_logps,
                    pair_references, parallelize, parse_flags, prompt_head_length, quiet_transformers, restore,
                    run_record, RunArgs, sample_responses, save_checkpoint, save_final, sequence_logps, start_run,
                    steps_of, sync_gradients, this_rank, toy_after, toy_before, toy_task, training_bar, truncate,
                    update, where, world_size, write_json)


@dataclass
class Args(RunArgs):  # the flags every script has (common.RunArgs), then Distilled DPO's own
    seed: int = flag(0, "seed of the data order, the bootstrap, the samples and everything random")
    resume: bool = flag(False, "continue the run in --output_dir, skipping every finished stage")
    max_eval_pairs: int = flag(512, "at most this many held-out pairs are evaluated")
    objective: str = flag("ensemble", "distill (one reward model), ensemble (min over K), pessimistic_dpo (DPO + gamma "
                          "forward KL), dpo", ["distill", "ensemble", "pessimistic_dpo", "dpo"])
    num_reward_models: int = flag(None, "K reward models to train (default: 1 for distill, 3 for ensemble)")
    reward_models: str = flag(None, "given reward models instead (comma-separated hub ids or directories of sequence "
                              "classifiers with one output)")
    margin_column: str = flag(None, "precomputed margins r(chosen) - r(rejected) instead (comma-separated columns of "
                              "--dataset and --eval_dataset)")
    reward_model_init: str = flag(None, "what the reward models are trained from (default: --model)")
    rm_learning_rate: float = flag(1e-5, "learning rate of the reward models")
    rm_epochs: int = flag(1, "passes of each reward model over its bootstrap resample")
    calibration: str = flag("temperature", "scale of the teachers' margins: temperature-scaled log-odds, unit std, or "
                            "as they are", ["temperature", "standardize", "none"])
    ensemble_min: str = flag("batch", "ensemble: the min over teachers of each micro-batch's loss, or of each pair's",
                             ["batch", "example"])
    gamma: float = flag(None, "weight of the forward KL(pi_ref || pi) (default: 0.1 for pessimistic_dpo, else 0)")
    kl_samples: int = flag(1, "reference samples per training prompt for the forward KL")
    max_new_tokens: int = flag(256, "length limit of the reference samples")
    length_bias: float = flag(0.0, "toy task only: the annotator's extra reward per 10 words of extra length")
    label_smoothing: float = flag(0.0, "cDPO label smoothing eps in [0, 0.5) for dpo, pessimistic_dpo (0 = plain DPO)")


# The toy task: dpo.py's toy settings, reward models at a larger step size, and an annotator biased toward length.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128, rm_learning_rate=3e-4, max_new_tokens=64, length_bias=1.0)
ARG_CHECKS = dict(max_eval_pairs=AT_LEAST_1, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                  num_reward_models=OPTIONAL_AT_LEAST_1, rm_learning_rate=POSITIVE, rm_epochs=AT_LEAST_1,
                  gamma=(lambda v: v is None or 0 <= v < math.inf, "0 or more"), kl_samples=AT_LEAST_1,
                  max_new_tokens=AT_LEAST_1, length_bias=(math.isfinite, "a finite number"))


def parse_args(argv=None):
    """The flags, over the toy's defaults when --model is not given, each one checked (common.parse_flags); then the
    defaults that follow --objective and the checks between the teachers' flags (objective_flags)."""
    return objective_flags(parse_flags(Args, TOY_DEFAULTS, ARG_CHECKS, argv, __doc__.split("\n")[0]))


# ---------------------------------------------------------------- ALGO LOGIC: the losses
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def distill_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 teacher_margins, beta, ensemble_min="batch"):
    """Per-pair squared distillation loss (Delta_k - beta h)^2 toward teacher margins (B, K), min over the K
    teachers of the batch's mean loss (ensemble_min "batch"; under torchrun the batch of all processes) or of each
    pair's ("example"); K = 1 is distill. Returns the losses (B,), the teacher each pair used (B,) and the
    implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_1)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_2)
    h = chosen_logratios - rejected_logratios  # (B,)
    squared = (teacher_margins - beta * h[:, None]) ** 2  # (B, K)
    if ensemble_min == "example":
        losses, teacher = squared.min(-1)  # (B,), (B,)
    else:
        teacher = mean_over_ranks(squared.detach().mean(0)).argmin().expand(len(h))  # (B,): one teacher for the batch
        losses = squared.gather(-1, teacher[:, None]).squeeze(-1)  # (B,)
    return losses, teacher, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def forward_kl(policy_sample_logps, reference_sample_logps):
    """KL(pi_ref || pi) per sample y ~ pi_ref: log pi_ref(y|x) - log pi(y|x) (S,); its gradient: SFT on the samples."""
    return reference_sample_logps - policy_sample_logps


def bradley_terry_loss(chosen_scores, rejected_scores):
    """The reward model's loss -log sigmoid(r(x, y_w) - r(x, y_l)) per pair (B,), and whether it ranks y_w first."""
    return -F.logsigmoid(chosen_scores - rejected_scores), (chosen_scores > rejected_scores).float()


def fit_temperature(margins, max_mean_log_odds=10.0):
    """tau minimising -mean log sigmoid(margin / tau) over pairs whose first response won (temperature scaling,
    Guo et al. 2017). The loss is convex in a = 1/tau, so a bisection on its derivative -E[m sigmoid(-a m)] finds it.
    inf when the margins rank no better than chance (mean <= 0: they carry nothing); when they separate the pairs
    the optimum is a = inf, and a is capped so that the mean calibrated |margin| is max_mean_log_odds."""
    m = margins.double()
    slope = lambda a: -(m * torch.sigmoid(-a * m)).mean().item()
    if len(m) == 0 or slope(0.0) >= 0:
        return math.inf
    cap = max_mean_log_odds / m.abs().mean().item()
    if slope(cap) <= 0:
        return 1 / cap
    low, high = 0.0, cap
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if slope(middle) < 0 else (low, middle)
    return 2 / (low + high)


def pair_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, targets=None):
    """TRL's metric names, as one tensor per name (means over the pairs), the mean size of the implicit margins,
    and for distillation the mean target margin that the pairs used."""
    margins = chosen_rewards - rejected_rewards  # (B,)
    metrics = {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
               "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "rewards/margins": margins.mean(), "rewards/abs_margins": margins.abs().mean(),
               "logps/chosen": policy_chosen_logps.detach().mean(),
               "logps/rejected": policy_rejected_logps.detach().mean()}
    return metrics if targets is None else {**metrics, "distill/target_margins": targets.mean()}


def objective_loss(args, policy_logps, ref_logps, teacher_margins):
    """The objective's per-pair loss, implicit rewards and metrics (the KL term is added in distill_step)."""
    if args.objective in ("dpo", "pessimistic_dpo"):
        losses, chosen_rewards, rejected_rewards = dpo_loss(*policy_logps, *ref_logps, args.beta, args.label_smoothing)
        targets = None
    else:
        losses, teacher, chosen_rewards, rejected_rewards = distill_loss(*policy_logps, *ref_logps, teacher_margins,
                                                                         args.beta, args.ensemble_min)
        targets = teacher_margins.gather(-1, teacher[:, None]).squeeze(-1)  # (B,)
    return losses, pair_metrics(losses.detach(), chosen_rewards, rejected_rewards, *policy_logps, targets)


# ---------------------------------------------------------------- data
def load_data(args, tokenizer):
    """Training and held-out pairs and their rows: --eval_dataset, or --eval_fraction of --dataset (seeded shuffle)."""
    train, train_rows = load_pairs_and_rows(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out, held_out_rows = load_pairs_and_rows(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
        held_out_rows, train_rows = [train_rows[i] for i in order[:n_eval]], [train_rows[i] for i in order[n_eval:]]
    print(f"{len(train)} training pairs, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return train, held_out[:args.max_eval_pairs], train_rows, held_out_rows[:args.max_eval_pairs]


def load_pairs_and_rows(source, tokenizer, args, split="train"):
    """Tokenised pairs (`load_pairs`) and the rows they come from, as (source, 0-based index, row): what a reader of
    the rows needs (another tokenizer, a column of its own, an error message that names the line)."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split)
    pairs = load_pairs(source, tokenizer, args, split, rows=rows)
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    kept = [(source, i, row) for i, row in enumerate(rows)  # the rows load_pairs keeps, by its rules
            if all(text(row[k]).strip() for k in ("prompt", "chosen", "rejected")) and row["chosen"] != row["rejected"]
            and len(encode_prompt(tokenizer, row["prompt"])) < args.max_length]
    assert len(kept) == len(pairs), "load_pairs_and_rows: the rows kept differ from load_pairs'"
    return pairs, kept


def encode_rows(rows, tokenizer, args):
    """The pairs of (source, index, row) rows under another tokenizer (a reward model's), cut to --max_length as
    `load_pairs` cuts them; none dropped, so they stay row for row."""
    pairs = []
    for _, _, row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        responses = [encode_response(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
        prompt, responses, _ = truncate(prompt, responses, args.max_length, args.max_prompt_length,
                                        prompt_head_length(tokenizer, row["prompt"], prompt))
        pairs.append((prompt, *responses))
    return pairs


def column_margins(rows, column):
    """A column of precomputed margins r(chosen) - r(rejected) of (source, index, row) rows as a tensor (N,) float64; a
    missing, non-numeric or non-finite value stops with its file, line and field."""
    values = []
    for source, i, row in rows:
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            sys.exit(f"error: {source}: {where(source, i)}: field '{column}': expected a finite number "
                     f"(a margin r(chosen) - r(rejected)), got {value!r}")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- stage 1: the teachers
def teachers(args):
    """The teachers as (kind, name): margin columns, given reward models, or trained ones (their directories)."""
    if args.objective in ("dpo", "pessimistic_dpo"):
        return []
    if args.margin_column:
        return [("column", c) for c in args.margin_column.split(",")]
    if args.reward_models:
        return [("given", name) for name in args.reward_models.split(",")]
    return [("trained", os.path.join(args.output_dir or "", f"reward_model_{k}"))
            for k in range(args.num_reward_models)]


def objective_flags(args):
    """The defaults that depend on --objective, and the checks between the teachers' flags; nothing read yet."""
    if args.num_reward_models is None:
        args.num_reward_models = 1 if args.objective == "distill" else 3
    if args.gamma is None:
        args.gamma = 0.1 if args.objective == "pessimistic_dpo" else 0.0
    if args.reward_models and args.margin_column:
        sys.exit("error: give the teachers once: --reward_models or --margin_column, not both")
    if args.objective in ("dpo", "pessimistic_dpo") and (args.reward_models or args.margin_column
                                                         or args.reward_model_init):
        sys.exit(f"error: --objective {args.objective} uses no reward model; --reward_models, --margin_column and "
                 f"--reward_model_init are for distill and ensemble")
    if args.objective == "distill" and len(teachers(args)) != 1:
        sys.exit(f"error: --objective distill distills one reward model, got {len(teachers(args))} "
                 f"(use --objective ensemble)")
    if args.objective == "dpo" and args.gamma > 0:
        sys.exit("error: --objective dpo with --gamma > 0 is pessimistic DPO: use --objective pessimistic_dpo")
    if args.objective == "pessimistic_dpo" and args.gamma == 0:
        sys.exit("error: --objective pessimistic_dpo needs --gamma > 0 (with 0 it is --objective dpo)")
    if args.model and args.length_bias != 0:
        sys.exit("error: --length_bias relabels the toy task's pairs; it cannot be used with --model")
    return args


def check_teachers(args, train_rows, held_out_rows):
    """Every teacher usable (given reward models, margin columns, --reward_model_init), before anything is written."""
    for kind, name in teachers(args):
        if kind == "given":
            check_reward_model(name, "--reward_models", args.trust_remote_code)
        elif kind == "column":
            column_margins(train_rows, name), column_margins(held_out_rows, name)
    if teachers(args) and teachers(args)[0][0] == "trained" and args.reward_model_init:
        from transformers import AutoConfig
        from_pretrained(AutoConfig, args.reward_model_init, "a model to train reward models from",
                        trust_remote_code=args.trust_remote_code)
        load_tokenizer(args.reward_model_init, args.trust_remote_code)


def bootstrap(n, seed, k):
    """Teacher k's resample of n training pairs (drawn with replacement) and its out-of-bag pairs, from the seed."""
    bag = torch.randint(n, (n,), generator=torch.Generator().manual_seed(seed * 1000 + k)).tolist()
    return bag, sorted(set(range(n)) - set(bag))


def train_reward_model(k, args, rows, device, directory):
    """Teacher k: a Bradley-Terry reward model from --reward_model_init (or --model) on a bootstrap resample, with
    a seed of its own; saved with save_pretrained in `directory` (written whole, then renamed). Under torchrun
    each rank takes its share of every step's pairs, as the policy's do."""
    init = args.reward_model_init or args.model
    bag, _ = bootstrap(len(rows), args.seed, k)
    with torch.random.fork_rng(devices=[]):  # the new head's weights: from the teacher's seed, not the global stream
        torch.manual_seed(args.seed * 1000 + k)
        model, tokenizer = load_reward_model(init, args, device, num_labels=1)
    parallelize(model, args)  # under torchrun: DDP or FSDP2; else nothing
    pairs = encode_rows(rows, tokenizer, args)
    rank, world = this_rank(), world_size()
    pairs_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
    steps_per_epoch = max(1, len(bag) // pairs_per_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rm_learning_rate, weight_decay=args.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    model.train()
    bar = tqdm(range(args.rm_epochs * steps_per_epoch), desc=f"reward model {k}")
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(len(bag), generator=torch.Generator().manual_seed(args.seed * 1000 + k + 1 + epoch))
        indices = [bag[i] for i in order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()]
        loss = accuracy = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            whole = indices[micro * args.batch_size * world:(micro + 1) * args.batch_size * world]  # every rank's
            if not whole:  # a bag smaller than a step: the same on every rank
                break
            sync_gradients(model, (micro + 1) * args.batch_size * world >= len(indices))  # its last micro-batch
            idx = whole[rank::world]  # every rank a forward pass (FSDP2 needs it); an empty share weighs 0
            chunk = [pairs[i] for i in idx or whole[:1]]
            losses, correct = bradley_terry_loss(*pair_reward_scores(model, chunk, tokenizer.pad_token_id, device))
            weight = world / len(indices) if idx else 0.0  # the ranks' gradients are averaged: the step's mean
            (losses.sum() * weight).backward()
            loss, accuracy = loss + losses.sum().detach() * weight, accuracy + correct.sum() * weight
        clip_grad_norm_(model, args.max_grad_norm)
        loss, accuracy = mean_over_ranks(torch.stack([loss, accuracy])).tolist()
        if not math.isfinite(loss):
            sys.exit(f"error: non-finite loss training reward model {k} at step {step + 1}; try a lower "
                     f"--rm_learning_rate")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.2f}")
        crash_point("reward_model")
    model_state, _ = full_state(model)  # under torchrun: gathered on rank 0

    def write():
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with quiet_transformers():  # no "Writing model shards" bar inside the run's
            model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, directory)
    on_rank_0(write)  # the other ranks wait for it: they read it next


# ---------------------------------------------------------------- stage 2: the margins
def pair_reward_scores(reward_model, pairs, pad_token_id, device):
    """A reward model's scores of chosen and rejected (B,), (B,), in one forward pass with each prompt computed once
    (`grouped_scores`), read where the model's own class reads them (the last token that is not padding)."""
    scores = grouped_scores(reward_model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, ...
    return scores[0::2], scores[1::2]


@torch.no_grad()
def model_margins(name, splits, args, device):
    """r(x, y_1) - r(x, y_2) of every row of each split (lists of (source, index, row)) under the reward model `name`,
    (N,) float64 each, the pairs tokenised by its tokenizer, each prompt computed once (`pair_reward_scores`). Under
    torchrun each rank computes its share and every rank gets the whole."""
    model, tokenizer = load_reward_model(name, args, device)
    frozen(model, args)  # under torchrun: sharded under FSDP2, whole under DDP
    margins = []
    for rows in splits:
        pairs, out = encode_rows(rows, tokenizer, args), [torch.zeros(0, dtype=torch.float64)]
        share = my_share(len(pairs))
        for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=f"margins of {name}"):
            chunk = [pairs[i] for i in share[s:s + 2 * args.batch_size]]
            chosen, rejected = pair_reward_scores(model, chunk, tokenizer.pad_token_id, device)
            out.append((chosen - rejected).double().cpu())
            crash_point("margins")
        margins.append(gather_shares(torch.cat(out), len(pairs)))
    return margins


def compute_margins(args, teacher_list, train_rows, held_out_rows, device):
    """Raw margins of every pair under every teacher, each teacher's scale (deviation 4) and its accuracies (on the
    toy also its agreement with the gold reward's order and how often it prefers the longer response)."""
    raw, scales, summary = {"train": [], "eval": []}, [], []
    for k, (kind, name) in enumerate(teacher_list):
        splits = [train_rows, held_out_rows]
        margins = ([column_margins(rows, name) for rows in splits] if kind == "column"
                   else model_margins(name, splits, args, device))
        raw["train"].append(margins[0])
        raw["eval"].append(margins[1])
        train = raw["train"][-1]
        held = bootstrap(len(train_rows), args.seed, k)[1] if kind == "trained" else list(range(len(train_rows)))
        if args.calibration == "temperature":
            temperature = fit_temperature(train[held])
            scale = 0.0 if math.isinf(temperature) else 1 / temperature
        else:
            std = train.std().item() if len(train) > 1 else 0.0
            scale = (1 / std if std > 0 else 0.0) if args.calibration == "standardize" else 1.0
        scales.append(scale)
        entry = {"teacher": k, "kind": kind, "name": name, "scale": scale,
                 "held_out": "out-of-bag" if kind == "trained" else "training pairs", "held_out_pairs": len(held),
                 "held_out_accuracy": (train[held] > 0).double().mean().item() if held else None,
                 "eval_accuracy": (raw["eval"][-1] > 0).double().mean().item(),
                 "mean_abs_margin": train.abs().mean().item(),
                 "mean_abs_calibrated_margin": scale * train.abs().mean().item()}
        if all("score_chosen" in row for _, _, row in train_rows):  # the toy: agreement with the gold reward's order
            gold = torch.tensor([row["score_chosen"] - row["score_rejected"] for _, _, row in train_rows])
            longer = torch.tensor([len(r["chosen"].split()) - len(r["rejected"].split()) for _, _, r in train_rows])
            entry["gold_agreement"] = ((train > 0) == (gold > 0)).double()[gold != 0].mean().item()
            entry["prefers_longer"] = ((train > 0) == (longer > 0)).double()[longer != 0].mean().item()
        summary.append(entry)
        print(f"teacher {k} ({kind} {name}): held-out accuracy {entry['held_out_accuracy'] if held else math.nan:.3f} "
              f"on {len(held)} {entry['held_out']}, accuracy {entry['eval_accuracy']:.3f} on {len(held_out_rows)} "
              f"held-out pairs, scale {scale:.4g}, mean |margin| {entry['mean_abs_margin']:.3f} -> "
              f"{entry['mean_abs_calibrated_margin']:.3f}"
              + (f", agrees with gold {entry['gold_agreement']:.3f}, prefers the longer {entry['prefers_longer']:.3f}"
                 if "gold_agreement" in entry else ""))
    scale = torch.tensor(scales, dtype=torch.float64)  # (K,)
    stack = lambda split: torch.stack(raw[split], -1) if raw[split] else torch.zeros(0, 0, dtype=torch.float64)
    return {"raw_train": stack("train"), "raw_eval": stack("eval"), "train": (stack("train") * scale).float(),
            "eval": (stack("eval") * scale).float(), "scale": scale, "teachers": summary}


def teacher_margins(args, run, record, train_rows, held_out_rows):
    """Stages 1 and 2: the teachers not yet trained, trained (each kept in reward_model_<k>/), then every pair's
    margin under every teacher, kept in margins.pt, and teachers.json. Returns margins(split, idx): (B, K) or None."""
    teacher_list = teachers(args)
    for k, (kind, name) in enumerate(teacher_list):
        if kind == "trained" and not on_rank_0(os.path.exists, name):  # the same answer on every rank
            train_reward_model(k, args, train_rows, run.device, name)
    if not teacher_list:
        return lambda split, idx: None
    cache = cached(os.path.join(args.output_dir, "margins.pt"), record,
                   lambda: compute_margins(args, teacher_list, train_rows, held_out_rows, run.device))
    path = os.path.join(args.output_dir, "teachers.json")
    if is_main() and not os.path.exists(path):
        write_json(path, cache["teachers"])
    return lambda split, idx: cache[split][list(idx)].to(run.device)  # (B, K)


# ---------------------------------------------------------------- stage 3: the reference, and its samples
@torch.no_grad()
def reference_samples(model, tokenizer, prompts, n, args, device):
    """n pure samples (`sample_responses`, temperature 1) from `model` for each prompt (token ids), at most
    --max_new_tokens and cut to fit --max_length, and their summed log-probs under it; drawn once (in eval mode)
    from --seed. Under torchrun each rank draws and scores its share (from a seed of its own) and every rank gets
    the whole: {"prompts": each prompt n times, "responses", "logps": (len(prompts) * n,)}."""
    flat = [p for p in prompts for _ in range(n)]
    mine = [flat[i] for i in my_share(len(flat))]  # every rank as many (FSDP2: the same forward passes)
    responses, was_training = [], model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1000003 * this_rank())
        for s in tqdm(range(0, len(mine), 64), desc="reference samples"):
            responses += sample_responses(model, tokenizer, mine[s:s + 64], args.max_new_tokens, 1.0, 64)
            crash_point("sample")
    responses = [(r[:max(1, args.max_length - len(p))] or [tokenizer.eos_token_id]) for p, r in zip(mine, responses)]
    model.eval()
    logps = [torch.zeros(0)]
    for s in range(0, len(mine), 64):
        batch = collate(list(zip(mine[s:s + 64], responses[s:s + 64])), tokenizer.pad_token_id)
        logps.append(sequence_logps(model, {k: v.to(device) for k, v in batch.items()})[0].cpu())
    model.train(was_training)
    responses = gather_shares(responses, len(flat))  # the ranks' shares, in order
    return {"prompts": flat, "responses": responses, "logps": gather_shares(torch.cat(logps), len(flat))}


def kl_samples_of(args, run, model, tokenizer, train, record):
    """The reference's samples (deviation 3), drawn once and kept in reference_samples.pt, and each training
    prompt's samples: (samples, {prompt: [sample index]})."""
    prompts = [list(p) for p in dict.fromkeys(tuple(p) for p, _, _ in train)]  # each distinct prompt once
    samples = cached(os.path.join(args.output_dir, "reference_samples.pt"), record,
                     lambda: reference_samples(model, tokenizer, prompts, args.kl_samples, args, run.device))
    of_prompt = {}
    for s, prompt in enumerate(samples["prompts"]):
        of_prompt.setdefault(tuple(prompt), []).append(s)
    return samples, of_prompt


# ---------------------------------------------------------------- the policy: a step, the evaluation
def distill_step(policy, train, indices, reference, margins, kl_samples, args, pad_token_id, device):
    """One optimizer step's backward passes: --grad_accum micro-batches of --batch_size pairs, the objective's loss
    (+ gamma KL(pi_ref || pi)) averaged over the step; `reference(chunk, idx)` gives the pairs' reference log-probs,
    `margins` their teachers'. Returns the step's mean metrics."""
    sums = {}
    for micro in range(args.grad_accum):
        idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
        sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
        chunk = [train[i] for i in idx]
        policy_logps = pair_logps(policy, chunk, pad_token_id, device)
        losses, metrics = objective_loss(args, policy_logps, reference(chunk, idx), margins("train", idx))
        loss = losses.mean()
        if args.gamma > 0:  # + gamma KL(pi_ref || pi) on the reference's samples for these prompts
            samples, of_prompt = kl_samples
            rows = [s for p, _, _ in chunk for s in of_prompt[tuple(p)]]
            batch = collate([(samples["prompts"][s], samples["responses"][s]) for s in rows], pad_token_id)
            policy_sample_logps = sequence_logps(policy, {k: v.to(device) for k, v in batch.items()})[0]  # (S,)
            kl = forward_kl(policy_sample_logps, samples["logps"][rows].to(device)).mean()
            loss = loss + args.gamma * kl
            metrics.update({"loss": loss.detach(), "kl/forward": kl.detach()})
        (loss / args.grad_accum).backward()
        sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
    return sums


@torch.no_grad()
def evaluate(policy, pairs, reference_logps, margins, args, pad_token_id, device):
    """Mean metrics of the objective's pair loss on held-out pairs, TRL's names with the eval_ prefix; eval mode.
    The log-probs are computed once (under torchrun, each rank its share); the loss a chunk of 2 x --batch_size
    pairs at a time (the ensemble's teacher is chosen per chunk)."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device).to(device)  # (N, 2)
    reference_logps = reference_logps.to(device)  # (N, 2)
    totals = {}
    for s in range(0, len(pairs), 2 * args.batch_size):
        span = range(s, min(s + 2 * args.batch_size, len(pairs)))
        _, metrics = objective_loss(args, policy_logps[s:span.stop].unbind(-1),
                                    reference_logps[s:span.stop].unbind(-1), margins("eval", span))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(span)
    return {f"eval_{k}": v / len(pairs) for k, v in totals.items()}


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    with start_run(args, argv, __file__) as run:  # torchrun, the output directory checked, Ctrl-C and SIGTERM
        toy, toy_dir = toy_task(args, dataset=None)  # without --model: the toy's SFT model and held-out pairs
        if toy:  # the toy's training pairs, relabelled by a length-biased annotator
            args.dataset = toy.relabelled_pairs(toy_dir, args.length_bias, args.seed)
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        pad = tokenizer.pad_token_id
        train, held_out, train_rows, held_out_rows = load_data(args, tokenizer)
        steps_per_epoch, max_steps = steps_of(args, len(train), run.world)
        pairs_per_step = args.batch_size * args.grad_accum * run.world  # each rank batch_size x grad_accum of them
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer, **{f"reward_model_{k}": name for k, (kind, name)
                                                in enumerate(teachers(args)) if kind == "given"},
                            reward_model_init=args.reward_model_init)
        if args.resume:
            check_resume(args, record)
        policy, parallel = load_policy(run, run.checkpoint)
        reference = None if args.ref_model is None else load_model(args.ref_model, args.dtype, run.device,
                                                                   args.trust_remote_code)
        check_teachers(args, train_rows, held_out_rows)  # every teacher usable, before anything is written
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record, "distilled_dpo")
        if parallel:
            print(f"{run.world} processes, {parallel.upper()}: {args.batch_size * args.grad_accum} pairs a process "
                  f"a step")
        margins = teacher_margins(args, run, record, train_rows, held_out_rows)  # stages 1 and 2
        reference_logps, held_out_ref = pair_references(args, run, policy, reference, train, held_out, record,
                                                        pad)  # stage 3: the reference
        kl_samples = kl_samples_of(args, run, reference or policy, tokenizer, train, record) if args.gamma > 0 else None
        optimizer, scheduler = make_optimizer(policy, args)
        start_step = restore(run.checkpoint, policy, optimizer, scheduler)[0] if run.checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return
        if toy:  # the toy's gold reward, length and KL of samples before training
            toy_reference = load_model(args.ref_model or args.model, args.dtype, run.device).eval()
            toy_prompts, before = toy_before(toy, toy_dir, toy_reference, tokenizer, args.seed)
        evaluate_held_out = lambda: evaluate(policy, held_out, held_out_ref, margins, args, pad, run.device)

        # ---------------------------------------------------------------- the training loop
        run.log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
        if start_step == 0:
            run.log({"step": 0, **evaluate_held_out()})
        policy.train()
        bar = training_bar(run, policy, start_step, max_steps, args.objective)
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[run.rank::run.world]
            sums = distill_step(policy, train, indices, reference_logps, margins, kl_samples, args, pad, run.device)
            row = update(run, policy, optimizer, scheduler, sums, step)  # clip, stop on NaN, the optimizer's step
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                       learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            save = lambda: save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step + 1)
            end_of_step(run, row, step, max_steps, bar, evaluate_held_out, save,
                        toy_curve=toy and (lambda: toy.evaluate(policy, toy_reference, tokenizer, toy_prompts,
                                                                seed=args.seed)))
        run.signals["stop_after_step"] = False
        if toy:
            toy_after(toy, toy_prompts, before, policy, toy_reference, tokenizer, args.seed, run.log, max_steps)
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


if __name__ == "__main__":
    main()
