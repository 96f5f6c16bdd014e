"""D2PO: Discriminator-Guided DPO with Response Evaluation Models (online DPO with a discriminator).
Singhal, Lambert, Niekum, Goyal, Durrett. 2024. https://arxiv.org/abs/2405.01511 (authors' code: PrasannS/d2po)

Gold preference labels (people, a strong judge, a program) are expensive and come in a budget. The policy keeps
sampling; a discriminator, a Bradley-Terry reward model trained on the gold labels so far, silver-labels the many
pairs that get no gold label, and the policy trains with DPO on both, against the fixed initial policy:

    y_a, y_b   ~ pi_theta(. | x)                                 two samples per prompt, temperature 1, no top-k/top-p
    s(x, y)    = r_phi(x, y)                                     silver score of every sample
    r_phi      : at the start, a reward model trained on a small gold set (--disc_model, or --disc_pretrain pairs)
    gold       : in each window, --gold_per_window pairs with the smallest |s_a - s_b| ("conf") or random ones,
                 until the window's gold is spent; a window lasts --window_pairs pairs, its gold steps included
    L_phi      = - mean log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))  on a window's gold pairs, once it is spent
    (y_w, y_l) = the gold order where a pair has one, else argmax / argmin of s (a tie: no DPO term)
    L_DPO      = - E[ log sigmoid(beta * h) ], h = [log pi(y_w|x) - log pi_0(y_w|x)] - [log pi(y_l|x) - log pi_0(y_l|x)]

--labels picks what the policy trains on, so the paper's comparisons run from this file at the same gold budget:
d2po (gold + discriminator silver labels), gold (online DPO where every pair is gold-labelled until the budget
is spent), static (the starting discriminator, with --initial_gold if given, never updated), self (the policy's own
implicit reward beta * (log pi - log pi_0) as the discriminator; gold still overrides in windows).
--gold says who labels: toy (the toy task's noisy annotator of its gold reward), rm:<hub id or path> (a
sequence-classification reward model), human (a terminal prompt: 1 / 2 / t for a tie / s to skip; piped stdin works).

The paper's discriminator starts from a reward model already trained on a small gold set (the authors' tiny_rm,
trained on the same initial gold data as their starting policy). So does this file's: on the toy, by default, it
first learns the toy's 1,920 annotated training pairs (the toy annotator's labels, --disc_pretrain; `--disc_pretrain
none` is the fresh-head ablation); on a real model give --disc_model (a reward model, or a small LM to start from)
or --disc_pretrain with preference pairs; a run with neither says at its start that it begins from a fresh head.
Those starting labels are not charged to --gold_budget: the authors' gold-label axis counts only the labels asked
for online, and their starting models are the same for every method they compare (on the toy, unlike there, the
gold-only baseline's policy has not seen them: compare D2PO with a static discriminator for that).

Run:
    python d2po.py                                       # built-in toy task, CPU, a few minutes
    python d2po.py --labels gold                         # the same gold budget, online DPO on gold labels only
    python d2po.py --disc_pretrain none --initial_gold 32   # the ablation: the discriminator from a fresh head
    python d2po.py --model Qwen/Qwen2.5-1.5B-Instruct --dataset trl-lib/ultrafeedback-prompt --output_dir out \\
        --gold rm:Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --disc_model Qwen/Qwen2.5-0.5B-Instruct --gold_budget 500
    python d2po.py --model M --dataset prompts.jsonl --gold human --gold_budget 200 --output_dir out
    python d2po.py <the same flags> --output_dir out --resume
    torchrun --nproc_per_node=8 d2po.py <the same flags>    # several GPUs: as dpo.py; each rank samples its share
                                                            # of the step's prompts, rank 0 alone asks for gold

Every gold label is appended to <output_dir>/gold.jsonl and flushed the moment it arrives; a resumed run reuses
a label it has (found by the pair's tokens) and never asks for it again, and the budget counts what is on disk.
A run with --gold human ends cleanly, with its labels and a checkpoint saved, when stdin ends. args.json,
--resume, Ctrl-C and SIGTERM behave as in dpo.py; checkpoints also hold the discriminator and its optimizer.

Memory: pi_0 is a frozen copy of the initial policy (or --ref_model), about a quarter of what the trained policy
needs with AdamW; the discriminator is a third model with its own AdamW (--disc_model can be much smaller).
docs/d2po.md has the details, and what each logged metric means.

Deviations from the paper and the authors' code:
1. One process: sampling, labelling, the discriminator and the policy update run in turn (the authors run two
   policy workers and a discriminator server). A window is --window_pairs pairs from its opening to the next
   window's, its gold steps included: the authors' SAMPN counts a window's texts, 256 by default, so 128 pairs, of
   which R = 16 are gold (1/8, the default here); a window's gold is taken from consecutive steps until spent.
2. Full fine-tuning with AdamW, and the DPO loss is the mean over a step's pairs (the authors: LoRA, Adam, the sum
   over a minibatch's pairs at lr 5e-5); --updates_per_step updates on them (their PPOUPDATES, 1 by default), each
   one an optimizer and scheduler step (so --warmup_steps counts updates).
3. The discriminator is a sequence classifier with one output, scored at the last non-padding token, trained in
   full (the authors: LoRA on a small reward model, input "Question: x\\n\\nAnswer: y"; here the prompt's and the
   response's tokens as the policy sees them). --disc_replay trains on all gold so far (the authors: the newest
   window only, the default). No gradient clipping of the discriminator, as the authors.
4. Pairs whose two samples are identical get no gold label and no DPO term (zero gradient), and so do pairs whose
   silver scores tie with no gold winner (the authors' argmax and argmin then pick one response twice). A gold tie
   is charged, gives no discriminator data and keeps the silver order (in --labels gold it drops the pair); a skip
   (human) is recorded and not charged.
5. The samples' length is free up to --max_new_tokens (the authors draw max_new_tokens near 50 and do not force
   EOS). Prompts are cut (their middle first) to leave --max_new_tokens of room within --max_length.
6. --labels self uses beta * (log pi - log pi_0) of the response tokens (the authors' code reverses prompt and
   response there and hard-codes the reference model).
7. The starting discriminator on the toy is the SFT model with a scalar head, trained for --disc_pretrain_epochs on
   the toy's annotated pairs (2 on the toy: held-out accuracy 0.77 against the annotator, 0.67 after 1) with an
   AdamW of its own; the online updates then use a fresh one (the authors: an
   OPT-125m-sized reward model with a new LoRA and a fresh AdamW; the size of their initial gold set is not
   recoverable from their code).
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (AT_LEAST_1, POSITIVE, ZERO_OR_MORE, all_pair_logps, check_resume, check_rows, claim_output_dir,
                    clip_grad_norm_, crash_point, disable_dropout, dpo_metrics, encode_prompt, end_of_step,
                    evaluate_pairs, finished, flag, from_pretrained, frozen, full_state, gather_shares, grouped_logps,
                    grouped_scores, is_main, load_model, load_model_state, load_optimizer_state, load_pairs,
                    load_policy, load_rows, load_tokenizer, make_optimizer, mean_over_ranks, my_share, on_rank_0,
                    open_metrics, pair_logps, parallelize, parse_flags, prompt_head_length, quiet_transformers,
                    report_dropped, restore, resume_command, run_record, RunArgs, sample_responses, save_checkpoint,
                    save_final, start_run, steps_of, stop, sync_gradients, this_rank, through_wrapper, torch_dtype,
                    torch_threads, toy_after, toy_before, toy_task, training_bar, truncate, world_size)


@dataclass
class Args(RunArgs):  # the flags every script has (common.RunArgs), D2PO's defaults where they differ, then its own
    ref_model: str = flag(None, "frozen reference model; default: a frozen copy of --model's initial weights")
    dataset: str = flag(None, "prompts (a prompt column) or preference pairs (their prompts): hub name, "
                              ".jsonl/.json/.parquet, or a save_to_disk folder (default: toy)")
    max_steps: int = flag(None, "policy steps (default: --epochs over the prompts; --labels gold stops when the "
                                "budget is spent)")
    batch_size: int = flag(8, "prompts (pairs) per micro-batch of the DPO update")
    grad_accum: int = flag(2, "micro-batches per step (authors: 16 prompts a step)")
    learning_rate: float = flag(1e-6, "peak learning rate of the policy (authors: 5e-5 with LoRA)")
    warmup_steps: int = flag(10, "linear warm-up steps, then constant")
    beta: float = flag(0.05, "KL strength beta (paper: 0.05)")
    max_eval_pairs: int = flag(512, "at most this many held-out pairs are evaluated")
    label_smoothing: float = flag(0.0, "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO, as the paper)")
    labels: str = flag("d2po", "what the policy trains on: gold + silver (d2po), "
                               "gold only, a static discriminator, or its own "
                               "implicit reward (self)", ["d2po", "gold", "static", "self"])
    gold: str = flag(None, "who gives gold labels: rm:<hub id or path> (a reward model), human (stdin), or toy (the "
                           "toy's annotator, which knows only its sentiment words); needed with --model")
    gold_budget: int = flag(1000, "gold labels in all, --initial_gold included, across resumes (ties are charged)")
    gold_per_window: int = flag(16, "gold labels R per window (authors: 2-100)")
    window_pairs: int = flag(128, "pairs from one window's opening to the next's, its gold steps included (authors' "
                                  "SAMPN: 256 texts)")
    gold_select: str = flag("conf", "which pairs get gold: the least confident (smallest |s_a - "
                                    "s_b|) or random", ["conf", "rand"])
    initial_gold: int = flag(0, "gold-labelled pairs of the initial policy to train the discriminator on before step "
                                "1 (charged)")
    disc_model: str = flag(None, "the discriminator's initial weights, a reward model as the paper's (default: "
                                 "--model's, with a fresh scalar head)")
    disc_pretrain: str = flag(None, "preference pairs the discriminator learns before step 1, as the paper's "
                                    "starting reward model (not charged; default: the toy's annotated pairs on the "
                                    "toy, else none; none: a fresh head)")
    disc_pretrain_epochs: int = flag(1, "epochs over --disc_pretrain's pairs")
    disc_learning_rate: float = flag(1e-5, "AdamW learning rate of the discriminator (authors: 1e-4 with LoRA)")
    disc_epochs: int = flag(4, "epochs U over a window's gold pairs (authors: 2-8)")
    disc_batch_size: int = flag(16, "gold pairs per discriminator step (authors: 16)")
    disc_replay: bool = flag(False, "train the discriminator on all gold so far at each window, not the newest only")
    max_new_tokens: int = flag(256, "most tokens a sampled response has")
    temperature: float = flag(1.0, "sampling temperature (paper: 1)")
    sample_batch_size: int = flag(64, "sequences per batch when sampling and scoring")
    updates_per_step: int = flag(1, "policy updates on each step's pairs (authors' PPOUPDATES: 1; 1-8 gold-only)")


TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=6, eval_every=40,
                    save_every=100, max_length=128, max_new_tokens=64, sample_batch_size=256, gold_budget=256,
                    gold_per_window=16, disc_learning_rate=1e-4, disc_pretrain_epochs=2, gold="toy")
ARG_CHECKS = dict(max_eval_pairs=AT_LEAST_1, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
                  gold=(lambda v: v in ("toy", "human") or (v or "").startswith("rm:") and len(v) > 3,
                        "toy, human or rm:<hub id or path>, and given with --model"),
                  gold_budget=ZERO_OR_MORE, initial_gold=ZERO_OR_MORE, disc_learning_rate=POSITIVE,
                  temperature=POSITIVE, **{name: AT_LEAST_1 for name in (
                      "gold_per_window", "window_pairs", "disc_epochs", "disc_pretrain_epochs", "disc_batch_size",
                      "max_new_tokens", "sample_batch_size", "updates_per_step")})


# ---------------------------------------------------------------- ALGO LOGIC: the loss
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def parse_args(argv=None):
    """The flags, over the toy's defaults when --model is not given, each one checked (common.parse_flags)."""
    return parse_flags(Args, TOY_DEFAULTS, ARG_CHECKS, argv, __doc__.split("\n")[0])


# ---------------------------------------------------------------- ALGO LOGIC: the discriminator and the gold labels
def bradley_terry_loss(chosen_scores, rejected_scores):
    """Per-pair Bradley-Terry loss of the discriminator, - log sigmoid(r(x, y_w) - r(x, y_l)): (B,), (B,) -> (B,)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def order_accuracy(scores_a, scores_b, a_wins):
    """How often the scores order a pair as gold does (a score tie counts 1/2): (B,), (B,), (B,) bool -> float."""
    agree = torch.where(a_wins, scores_a > scores_b, scores_b > scores_a).float() + 0.5 * (scores_a == scores_b).float()
    return agree.mean().item()


def gold_candidates(margins, eligible, n, how, generator):
    """Which pairs of a step get gold labels: of the eligible ones, the n with the smallest |s_a - s_b| ("conf",
    ties in the order of the batch) or n random ones ("rand"). margins (P,) = s_a - s_b, eligible (P,) bool."""
    index = eligible.nonzero().squeeze(-1)  # (E,)
    if how == "conf":
        index = index[margins[index].abs().argsort(stable=True)]
    else:
        index = index[torch.randperm(len(index), generator=generator)]
    return index[:n].tolist()


def pair_order(margins, gold):
    """Index (0 for a, 1 for b) of y_w of each pair: the gold winner where the pair has one ("a" / "b" in `gold`, a
    dict pair -> label), else the higher silver score; None for a silver tie without a gold winner, which gets no
    DPO term (the authors' argmax and argmin pick the same response: h = 0, no gradient). margins (P,) = s_a - s_b."""
    silver = lambda m: 0 if m > 0 else 1 if m < 0 else None
    return [{"a": 0, "b": 1}.get(gold.get(i), silver(m)) for i, m in enumerate(margins.tolist())]


def dpo_pairs(margins, gold, eligible, gold_only=False):
    """The pairs of a step the policy trains on and the index of each one's y_w (0: y_a, 1: y_b), in the order of
    `pair_order`; no pair of identical samples (eligible (P,) bool), no silver tie without a gold winner, and with
    gold_only no pair without a gold winner. Returns (kept pair indices, their winners)."""
    winners = pair_order(margins, gold)
    keep = [i for i, win in enumerate(winners) if eligible[i] and win is not None
            and (not gold_only or gold.get(i) in ("a", "b"))]
    return keep, [winners[i] for i in keep]


@torch.no_grad()
def response_logps(model, groups, pad_token_id, device, batch_size):
    """(K,) summed log-probs of every response of the (prompt_ids, [response_ids, ...]) groups, in eval mode. Under
    torchrun each rank computes its share of the groups and every rank gets all (the groups' sizes must be equal)."""
    mine, out, was_training = [groups[i] for i in my_share(len(groups))], [torch.zeros(0)], model.training
    model.eval()
    per_batch = max(1, batch_size // max(len(r) for _, r in groups))
    for s in range(0, len(mine), per_batch):
        out.append(grouped_logps(model, mine[s:s + per_batch], pad_token_id, device)[0].float().cpu())
    model.train(was_training)
    return gather_shares(torch.cat(out), sum(len(r) for _, r in groups))


def scalar_scores(model, rows, pad_token_id, device):
    """r(x, y) of each token-id row from a sequence classifier with one output, at the row's last non-padding token
    (right padding; transformers' pooling takes the rightmost token that is not the pad token): (B,) fp32."""
    B, T = len(rows), max(map(len, rows))
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)], attention_mask[i, :len(row)] = torch.tensor(row), 1
    forward = lambda: model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return through_wrapper(model, forward)[:, 0].float()  # (B,); under torchrun inside the DDP/FSDP2 wrapper


def prefix_groups(row_pairs):
    """[(row_a, row_b)] -> [(their common beginning, [the rest of a, the rest of b])], each rest at least one token
    long (common.grouped_scores' groups); None if some pair's rows differ in their first token."""
    groups = []
    for a, b in row_pairs:
        n = 0
        while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
            n += 1
        if n == 0:
            return None
        groups.append((a[:n], [a[n:], b[n:]]))
    return groups


def pair_scores(model, row_pairs, pad_token_id, device, alone=False):
    """(B, 2) scores of [(row_a, row_b)] in one forward pass of the classifier, the pairs' common beginnings (their
    prompts) computed once (common.grouped_scores); row by row if some pair has none. With gradients if enabled."""
    groups = prefix_groups(row_pairs)
    if groups is None:
        return scalar_scores(model, [r for pair in row_pairs for r in pair], pad_token_id, device).view(-1, 2)
    return grouped_scores(model, groups, pad_token_id, device, alone).view(-1, 2)


@torch.no_grad()
def score_pairs(model, row_pairs, pad_token_id, device, batch_size, alone=False):
    """(P, 2) scores of [(row_a, row_b)] token-id rows (`pair_scores`), in eval mode, batch_size rows a forward pass.
    Under torchrun each rank scores its share of the pairs and every rank gets all; alone=True: this process
    scores them all by itself (the judge, which rank 0 asks alone)."""
    was_training, mine = model.training, row_pairs if alone else [row_pairs[i] for i in my_share(len(row_pairs))]
    model.eval()
    per = max(1, batch_size // 2)
    out = torch.cat([torch.zeros(0, 2)] + [pair_scores(model, mine[s:s + per], pad_token_id, device, alone).cpu()
                                           for s in range(0, len(mine), per)])
    model.train(was_training)
    return out if alone else gather_shares(out, len(row_pairs))


def train_discriminator(model, optimizer, pairs, args, pad_token_id, device, generator, epochs=None):
    """U epochs (--disc_epochs, or `epochs`) of the Bradley-Terry loss over `pairs` [(chosen_row, rejected_row)] in
    shuffled batches of --disc_batch_size, continuing from the model's and optimizer's state; returns the last
    epoch's mean loss."""
    model.train()
    for _ in range(epochs or args.disc_epochs):
        total = 0.0
        for batch in torch.randperm(len(pairs), generator=generator).split(args.disc_batch_size):
            scores = pair_scores(model, [pairs[i] for i in batch.tolist()], pad_token_id, device)  # (b, 2)
            loss = bradley_terry_loss(scores[:, 0], scores[:, 1]).mean()  # every rank the same batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    model.eval()
    return total / len(pairs)


class GoldLog:
    """<output_dir>/gold.jsonl: one line per gold label, appended and flushed to disk the moment it arrives. A label
    is found again by its pair's tokens; the budget counts the charged labels on disk (skips are free)."""

    def __init__(self, path):
        self.path, self.rows = path, {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
            complete = raw[:raw.rfind(b"\n") + 1]  # a line cut short by a kill is dropped: that label is asked again
            if len(complete) < len(raw):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.decode().splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row
        self.charged = sum(row["label"] != "skip" for row in self.rows.values())
        self.file = open(path, "a")

    @staticmethod
    def key(prompt_ids, a_ids, b_ids):
        return hashlib.sha256(json.dumps([prompt_ids, a_ids, b_ids]).encode()).hexdigest()[:32]

    def get(self, key):
        return self.rows.get(key)

    def append(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.rows[row["key"]] = row
        self.charged += row["label"] != "skip"


class InputEnded(Exception):
    """The human labeller's stdin ended (`step`: the steps done, set by the loop; None before step 1)."""
    step = None


def toy_gold(seed):
    """The toy task's annotator: a noisy Bradley-Terry judge of the toy's gold reward (76% agreement with it on the
    toy's pairs), drawn from a random stream of its own for each pair, so a label asked again is the same."""
    import toy

    def ask(pair):
        ga, gb = toy.gold_reward(pair["a"]), toy.gold_reward(pair["b"])
        rng = random.Random(f"{seed}/gold/{pair['key']}")
        return "a" if toy.annotate(ga, gb, len(pair["a"].split()), len(pair["b"].split()), rng) else "b"
    return ask


def reward_model_gold(name, args, device):
    """A Hugging Face sequence-classification reward model with one output as the judge: the higher score wins
    (equal scores are a tie). Chat prompts are rendered with its tokenizer's chat template. `ask.prepare(pairs)`
    scores a step's pairs in batches of --sample_batch_size rows; `ask(pair)` then returns the pair's verdict."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = from_pretrained(AutoConfig, name, "a reward model's config", trust_remote_code=args.trust_remote_code)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise SystemExit(f"error: --gold rm:{name}: not a sequence-classification reward model with one output "
                         f"(architectures {architectures}, num_labels {config.num_labels})")
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    model = from_pretrained(AutoModelForSequenceClassification, name, "a reward model",
                            trust_remote_code=args.trust_remote_code,
                            dtype=torch_dtype(args.dtype, device)).to(device).eval()
    model.config.pad_token_id = tokenizer.pad_token_id

    def rows(pair):
        if isinstance(pair["raw_prompt"], list) and tokenizer.chat_template:
            texts = [tokenizer.apply_chat_template(pair["raw_prompt"] + [{"role": "assistant", "content": pair[k]}],
                                                   tokenize=False) for k in ("a", "b")]
            return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [tokenizer(pair["prompt"] + pair[k])["input_ids"] for k in ("a", "b")]

    verdicts = {}  # pair key -> "a", "b" or "tie", of the pairs prepared last

    def prepare(pairs):  # the judge runs on rank 0 alone
        scores = score_pairs(model, [rows(pair) for pair in pairs], tokenizer.pad_token_id, device,
                             args.sample_batch_size, alone=True).tolist()
        verdicts.clear()
        verdicts.update({pair["key"]: "a" if a > b else "b" if b > a else "tie" for pair, (a, b) in zip(pairs, scores)})

    def ask(pair):
        if pair["key"] not in verdicts:
            prepare([pair])
        return verdicts[pair["key"]]
    ask.prepare = prepare
    return ask


def human_gold(stdin=None, out=None):
    """A terminal prompt: shows the prompt and both responses, reads 1, 2, t (tie) or s (skip) from stdin (a pipe
    works); raises InputEnded when stdin ends."""
    def ask(pair):
        stream_in, stream_out = stdin or sys.stdin, out or sys.stderr
        stream_out.write(f"\n=== prompt\n{pair['prompt']}\n=== response 1\n{pair['a']}\n=== response 2\n{pair['b']}\n"
                         f"which is better? 1 / 2 / t (tie) / s (skip): ")
        stream_out.flush()
        while True:
            line = stream_in.readline()
            if not line:
                raise InputEnded
            answer = {"1": "a", "2": "b", "t": "tie", "s": "skip"}.get(line.strip().lower())
            if answer:
                return answer
            stream_out.write("please type 1, 2, t or s: ")
            stream_out.flush()
    return ask


def gold_on_rank_0(ask, log, pairs, budget, meta):
    """collect_gold on rank 0 alone (the only one that asks and writes gold.jsonl), its labels given to every rank;
    InputEnded on every rank when the labeller's stdin ended."""
    def ask_once():
        try:
            return collect_gold(ask, log, pairs, budget, meta)
        except InputEnded:
            return None
    result = on_rank_0(ask_once)
    if result is None:
        raise InputEnded
    return result


def collect_gold(ask, log, pairs, budget, meta):
    """Gold labels of `pairs` (dicts with key, prompt, a, b), in order: the one on disk if the pair has one, else
    asked and appended to the log at once, while the charged labels on disk stay within `budget`. Returns the
    labels of the pairs it could label (a prefix of `pairs`) and how many of them were asked now."""
    labels, asked = [], 0
    if hasattr(ask, "prepare"):  # a judge that labels many pairs at once (a reward model), each label charged
        todo = [pair for pair in pairs if log.get(pair["key"]) is None][:max(0, budget - log.charged)]
        if todo:
            ask.prepare(todo)
    for pair in pairs:
        row = log.get(pair["key"])
        if row is None:
            if log.charged >= budget:
                break
            label = ask(pair)  # may raise InputEnded
            crash_point("gold")  # a kill here loses this label, which was not charged: asked again on resume
            row = {"key": pair["key"], "label": label, **meta, "prompt": pair["prompt"], "response_a": pair["a"],
                   "response_b": pair["b"]}
            log.append(row)
            asked += 1
        labels.append(row["label"])
    return labels, asked



# ---------------------------------------------------------------- data
def load_data(args, tokenizer):
    """Training prompts [(prompt as given, prompt_ids)], distinct, each cut to leave --max_new_tokens of room; and
    held-out pairs: --eval_dataset, or --eval_fraction of --dataset's pairs (by a seeded shuffle) if it has pairs."""
    rows = load_rows(args.dataset, ["prompt"], args.dataset_split)  # a prompt column, or the prompts of pairs
    paired = bool(rows) and {"chosen", "rejected"} <= set(rows[0])
    if paired:
        check_rows(args.dataset, rows, ["prompt", "chosen", "rejected"])
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    usable = [i for i in order if paired and all(text(rows[i][k]).strip() for k in ("prompt", "chosen", "rejected"))
              and rows[i]["chosen"] != rows[i]["rejected"]]  # pairs that can be held out
    n_eval = 0 if args.eval_dataset or not usable else \
        max(1, min(args.max_eval_pairs, int(len(rows) * args.eval_fraction)))
    held = set(usable[:n_eval])
    held_out = (load_pairs(args.eval_dataset, tokenizer, args, "test") if args.eval_dataset else
                load_pairs(args.dataset, tokenizer, args, rows=[rows[i] for i in usable[:n_eval]]) if n_eval else [])
    max_prompt_length = min(args.max_prompt_length or args.max_length // 2, args.max_length - args.max_new_tokens)
    dropped, prompts, seen, n_cut = {"empty prompt": [], "repeated prompt": []}, [], set(), 0
    for i in (i for i in range(len(rows)) if i not in held):
        prompt, key = rows[i]["prompt"], json.dumps(rows[i]["prompt"])
        if not text(prompt).strip():
            dropped["empty prompt"].append(i + 1)
        elif key in seen:
            dropped["repeated prompt"].append(i + 1)
        else:
            seen.add(key)
            ids = encode_prompt(tokenizer, prompt)
            ids, _, cut = truncate(ids, [[0] * args.max_new_tokens], args.max_length, max_prompt_length,
                                   prompt_head_length(tokenizer, prompt, ids))
            prompts.append((prompt, ids))
            n_cut += cut
    report_dropped(args.dataset, {k: v for k, v in dropped.items() if k != "repeated prompt"}, len(rows) - n_eval)
    if n_cut:
        print(f"{args.dataset}: cut {n_cut} of {len(prompts)} prompts to leave --max_new_tokens {args.max_new_tokens} "
              f"of --max_length {args.max_length}")
    print(f"{len(prompts)} distinct training prompts, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return prompts, held_out[:args.max_eval_pairs]




# ---------------------------------------------------------------- models, sampling
def load_discriminator(args, device):
    """The discriminator r_phi: --disc_model (default --model) as a sequence classifier with one output, a fresh
    scalar head on a causal LM's weights; dropout off. Returns it and its tokenizer."""
    from transformers import AutoModelForSequenceClassification
    name = args.disc_model or args.model
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    model = from_pretrained(AutoModelForSequenceClassification, name, "a sequence classifier (the discriminator)",
                            num_labels=1, dtype=torch_dtype(args.dtype, device),
                            trust_remote_code=args.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model).to(device).eval(), tokenizer


def sample_pairs(policy, tokenizer, prompt_ids, args, seed):
    """Two samples y_a, y_b of the policy for each prompt, batched with the KV cache, from a seed of the step's own.
    Under torchrun each rank samples its share of the prompts (its own seed) and every rank gets all samples."""
    mine = [prompt_ids[i] for i in my_share(len(prompt_ids))]
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed * world_size() + this_rank())
        responses = sample_responses(policy, tokenizer, mine + mine, args.max_new_tokens, args.temperature,
                                     args.sample_batch_size)
    crash_point("sample")
    pairs = gather_shares(list(zip(responses[:len(mine)], responses[len(mine):])), len(prompt_ids))
    return [a for a, _ in pairs], [b for _, b in pairs]



def pretrain_discriminator(discriminator, pairs, held_out, to_disc, args, pad_token_id, device):
    """The paper's starting discriminator (the authors' tiny_rm, a reward model trained on a small initial gold set):
    --disc_pretrain_epochs of the Bradley-Terry loss on `pairs` [(chosen_row, rejected_row)] with an AdamW of its
    own, before step 1. Its labels are not charged to --gold_budget, as the authors' plots count only the labels
    collected online. Returns what it logs: the pairs, the last epoch's loss, held-out order accuracy."""
    optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_learning_rate)
    loss = train_discriminator(discriminator, optimizer, pairs, args, pad_token_id, device,
                               torch.Generator().manual_seed(args.seed), epochs=args.disc_pretrain_epochs)
    if not math.isfinite(loss):
        raise SystemExit(f"error: the discriminator's loss is {loss} after pretraining on {args.disc_pretrain}")
    logged = {"disc/pretrain_pairs": len(pairs), "disc/pretrain_loss": loss}
    if held_out:
        scores = score_pairs(discriminator, [(to_disc(p, c), to_disc(p, r)) for p, c, r in held_out], pad_token_id,
                             device, args.sample_batch_size)  # (n, 2)
        logged["disc/pretrain_eval_accuracy"] = order_accuracy(scores[:, 0], scores[:, 1],
                                                               torch.ones(len(held_out), dtype=torch.bool))
    tqdm.write(f"discriminator: {args.disc_pretrain_epochs} epoch(s) on {len(pairs)} pairs of {args.disc_pretrain} "
               f"before step 1 (loss {loss:.3f}" + (f", held-out accuracy {logged['disc/pretrain_eval_accuracy']:.3f}"
                                                    if held_out else "") + "; not charged to the gold budget)")
    return logged


def close_window(w, args, discriminator, disc_optimizer, pad_token_id, device):
    """A window's gold is spent: the discriminator's accuracy on it (with the scores it had when the pairs were
    labelled, so before training on them), then, for --labels d2po, U epochs on it (or on all gold, --disc_replay)."""
    if w.pairs:
        w.accuracies.append(order_accuracy(torch.tensor([p["score_chosen"] for p in w.pairs]),
                                           torch.tensor([p["score_rejected"] for p in w.pairs]),
                                           torch.ones(len(w.pairs), dtype=torch.bool)))
        if discriminator is not None:
            w.all_gold += [(p["chosen"], p["rejected"]) for p in w.pairs] if args.disc_replay else []
            data = w.all_gold if args.disc_replay else [(p["chosen"], p["rejected"]) for p in w.pairs]
            generator = torch.Generator().manual_seed(args.seed * 1000 + w.number)
            w.disc_loss = train_discriminator(discriminator, disc_optimizer, data, args, pad_token_id, device,
                                              generator)
            if not math.isfinite(w.disc_loss):
                raise SystemExit(f"error: the discriminator's loss is {w.disc_loss} after window {w.number}")
    w.pairs, w.open, w.left, w.number = [], False, 0, w.number + 1


def check_flags(args):
    """D2PO's checks of flags that depend on each other, before anything is read. A default that depends on other
    flags follows from them (no starting discriminator where there is none), and an error names what was given."""
    if args.max_new_tokens >= args.max_length:
        sys.exit(f"error: --max_new_tokens {args.max_new_tokens} must be less than --max_length {args.max_length}")
    has_discriminator = args.labels in ("d2po", "static")
    for name in ("initial_gold", "disc_pretrain", "disc_model"):
        if getattr(args, name) not in (None, 0, "none") and not has_discriminator:
            sys.exit(f"error: --{name} is for the discriminator, which --labels {args.labels} does not have")
    if args.disc_pretrain is None:  # the paper's starting point where the toy has one: a reward model on its pairs
        args.disc_pretrain = "toy" if args.model is None and has_discriminator and not args.disc_model else "none"
    if args.labels == "static" and not (args.initial_gold or args.disc_model or args.disc_pretrain != "none"):
        sys.exit("error: --labels static needs a trained discriminator: --initial_gold N, --disc_pretrain or "
                 "--disc_model (its discriminator is never updated)")
    if args.initial_gold > args.gold_budget:
        sys.exit(f"error: --initial_gold {args.initial_gold} is more than the gold budget ({args.gold_budget})")



# ---------------------------------------------------------------- the run's pieces
@dataclass
class Window:
    """D2PO's gold windows: window `number` asks for gold while open, `left` more labels; `seen` counts the pairs
    since it opened (its gold steps included) and at --window_pairs the next one may open; `pairs` are its gold pairs
    with the scores they had when labelled (for the discriminator); the rest is what the run reports."""
    number: int = 1
    open: bool = True
    left: int = 0
    seen: int = 0
    pairs: list = field(default_factory=list)
    all_gold: list = field(default_factory=list)
    accuracies: list = field(default_factory=list)
    disc_loss: float = None
    gold_used: int = 0


@dataclass
class Models:
    """What a D2PO step uses besides the policy: the frozen pi_0, the discriminator (None in --labels gold and self)
    with its optimizer and tokenizer, the gold labeller (rank 0's) and its log, and the tokenizers' conversions."""
    args: Args
    device: str
    tokenizer: object
    reference: object
    discriminator: object = None
    disc_optimizer: object = None
    disc_tokenizer: object = None
    ask: object = None
    gold_log: GoldLog = None
    same_vocab: bool = True  # the discriminator reads the policy's tokens as they are

    def to_disc(self, prompt_ids, response_ids):
        """A (prompt, response) row in the discriminator's tokens, cut to its last --max_length."""
        ids = prompt_ids + response_ids
        ids = ids if self.same_vocab else self.disc_tokenizer(self.tokenizer.decode(ids))["input_ids"]
        return ids[-self.args.max_length:]

    @property
    def disc_pad(self):
        return self.disc_tokenizer.pad_token_id if self.disc_tokenizer else None

    def items(self, batch, responses_a, responses_b):
        """The step's pairs as the labellers see them: key, decoded prompt and responses, the prompt as given."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        return [dict(key=GoldLog.key(ids, a, b), prompt=decode(ids), a=decode(a), b=decode(b), raw_prompt=raw)
                for (raw, ids), a, b in zip(batch, responses_a, responses_b)]


def setup(args, run, tokenizer, reference):
    """The discriminator (for --labels d2po and static) with its AdamW, and the gold labeller on rank 0."""
    m = Models(args, run.device, tokenizer, reference)
    if args.labels in ("d2po", "static"):
        m.discriminator, m.disc_tokenizer = load_discriminator(args, run.device)
        parallelize(m.discriminator, args)
        m.disc_optimizer = torch.optim.AdamW(m.discriminator.parameters(), lr=args.disc_learning_rate)
        m.same_vocab = m.disc_tokenizer.get_vocab() == tokenizer.get_vocab()
        if not args.disc_model and args.disc_pretrain == "none":
            print(f"the discriminator starts from {args.model} with a fresh scalar head; the paper starts it from "
                  f"a reward model trained on a small gold set (--disc_model, or --disc_pretrain pairs)")
    m.ask = None if not is_main() else (  # the gold labeller lives on rank 0
        toy_gold(args.seed) if args.gold == "toy" else human_gold() if args.gold == "human" else
        reward_model_gold(args.gold[3:], args, run.device))
    return m


def initial_gold(m, window, prompts):
    """--initial_gold: gold labels of the initial policy's samples, before step 1, as window 0 of the discriminator."""
    args = m.args
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batch = [prompts[order[i % len(prompts)]] for i in range(args.initial_gold)]
    responses_a, responses_b = sample_pairs(m.reference, m.tokenizer, [ids for _, ids in batch], args,
                                            args.seed * 1000003)
    differ = [i for i, (a, b) in enumerate(zip(responses_a, responses_b)) if a != b]
    items = m.items(batch, responses_a, responses_b)
    labels, _ = gold_on_rank_0(m.ask, m.gold_log, [items[i] for i in differ], args.gold_budget,
                               {"step": 0, "window": 0})
    window.gold_used = sum(label != "skip" for label in labels)
    rows = [(m.to_disc(batch[i][1], responses_a[i]), m.to_disc(batch[i][1], responses_b[i])) for i in differ]
    scores = score_pairs(m.discriminator, rows, m.disc_pad, m.device, args.sample_batch_size)  # (n, 2)
    window.pairs, window.number = [{"chosen": rows[i][label == "b"], "rejected": rows[i][label == "a"],
                                    "score_chosen": scores[i, int(label == "b")].item(),
                                    "score_rejected": scores[i, int(label == "a")].item()}
                                   for i, label in enumerate(labels) if label in ("a", "b")], 0
    close_window(window, args, m.discriminator, m.disc_optimizer, m.disc_pad, m.device)  # window 0
    window.open, window.left = args.labels == "d2po", args.gold_per_window


def silver_scores(m, policy, groups, reference_logps):
    """s(x, y_a), s(x, y_b) of the step's samples: the discriminator's, or the policy's own implicit reward (self),
    or none (gold). (P, 2)."""
    args = m.args
    if m.discriminator is not None:
        rows = [(m.to_disc(ids, a), m.to_disc(ids, b)) for ids, (a, b) in groups]
        return score_pairs(m.discriminator, rows, m.disc_pad, m.device, args.sample_batch_size)  # (P, 2)
    if args.labels == "self":
        logps = response_logps(policy, groups, m.tokenizer.pad_token_id, m.device, args.sample_batch_size).view(-1, 2)
        return args.beta * (logps - reference_logps)  # (P, 2)
    return torch.zeros(len(groups), 2)


def gold_labels(m, w, margins, eligible, items, groups, scores, step):
    """The step's gold labels while the budget lasts, {pair: label}: in --labels gold every pair, else the open
    window's least confident (or random) pairs; a window whose gold is spent is closed (the discriminator trains on
    it), and --window_pairs after it opened the next one opens. Updates the window `w`."""
    args = m.args
    windows = args.labels in ("d2po", "self")
    if windows and not w.open and w.seen >= args.window_pairs and w.gold_used < args.gold_budget:
        w.open, w.left, w.seen = True, args.gold_per_window, 0  # the next window: --window_pairs after the last
    was_open, gold = w.open and windows, {}
    if args.labels == "gold" or was_open:
        n = len(items) if args.labels == "gold" else w.left
        chosen = gold_candidates(margins, eligible, n, args.gold_select if args.labels != "gold" else "conf",
                                 torch.Generator().manual_seed(args.seed * 1000003 + step + 1))
        labels, _ = gold_on_rank_0(m.ask, m.gold_log, [items[i] for i in chosen], args.gold_budget,
                                   {"step": step + 1, "window": w.number if was_open else None})
        gold = dict(zip(chosen, labels))
        charged = sum(label != "skip" for label in labels)
        w.gold_used += charged
        if was_open:
            w.left -= charged
            w.pairs += [window_pair(m, groups[i], scores[i], int(label == "b")) for i, label in gold.items()
                        if label in ("a", "b")]
            if w.left <= 0 or len(labels) < len(chosen) or w.gold_used >= args.gold_budget:
                discriminator = m.discriminator if args.labels == "d2po" else None
                close_window(w, args, discriminator, m.disc_optimizer, m.disc_pad, m.device)
    if windows:
        w.seen += len(items)  # the authors count a window's texts, two a pair, gold steps included
    return gold


def window_pair(m, group, scores, win):
    """A gold pair for the discriminator: its two rows in gold order (None without a discriminator) and the scores
    they had when labelled."""
    prompt_ids, responses = group
    rows = [m.to_disc(prompt_ids, responses[win]), m.to_disc(prompt_ids, responses[1 - win])] \
        if m.discriminator else [None, None]
    return {"chosen": rows[0], "rejected": rows[1], "score_chosen": scores[win].item(),
            "score_rejected": scores[1 - win].item()}


def policy_updates(m, run, policy, optimizer, scheduler, step_pairs, step_reference, step):
    """--updates_per_step DPO updates on the step's pairs against the fixed pi_0, the loss a mean over the pairs
    (deviation 2); under torchrun each rank takes its share (weight 0 on the repeats that even the shares out).
    Returns the first update's metrics (on the policy that sampled the pairs)."""
    args, world = m.args, run.world
    share, weights = my_share(len(step_pairs), weights=True)
    first = None
    for _ in range(args.updates_per_step):
        sums = {}
        for s in range(0, len(share), args.batch_size):
            idx, weight = share[s:s + args.batch_size], weights[s:s + args.batch_size]
            sync_gradients(policy, s + args.batch_size >= len(share))  # under torchrun: once an update
            metrics, n = dpo_chunk(m, policy, [step_pairs[i] for i in idx], step_reference[idx], weight, world,
                                   len(step_pairs))
            sums = {k: sums.get(k, 0) + v * n / len(step_pairs) for k, v in metrics.items()}
        grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
        summed = mean_over_ranks(torch.stack([*sums.values()])) * world if sums else grad_norm.new_zeros(0)
        values = torch.cat([summed.float(), grad_norm.float()[None]]).tolist()  # the update's one host sync
        first = first or dict(zip([*sums, "grad_norm"], values))  # the first update's
        if not all(map(math.isfinite, values)):
            stop(f"non-finite loss or gradient at step {step + 1} ({dict(zip([*sums, 'grad_norm'], values))})",
                 args.output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return first


def dpo_chunk(m, policy, chunk, reference, weight, world, n_pairs):
    """The DPO loss's backward pass on a chunk of the step's n_pairs pairs, weighted (0: a repeat), so that the
    ranks' averaged gradients are the step's mean; returns the chunk's metrics over its own pairs, and their number."""
    policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, m.tokenizer.pad_token_id, m.device)
    reference_chosen_logps, reference_rejected_logps = reference.to(m.device).unbind(-1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                        reference_chosen_logps, reference_rejected_logps,
                                                        m.args.beta, m.args.label_smoothing)
    ((losses * weight.to(m.device)).sum() * world / n_pairs).backward()  # x world: the ranks' gradients are averaged
    real = weight.nonzero().squeeze(-1)  # (n,) on the host: the rank's own pairs, not repeats
    pick = lambda t: t if len(real) in (0, len(chunk)) else t.index_select(0, real.to(t.device))
    return dpo_metrics(*map(pick, (losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps,
                                   policy_rejected_logps))), len(real)


def gold_metrics(m, w, items, scores, eligible, keep, gold):
    """What the step logs of gold and silver: labels used, the step's gold and silver pairs, the discriminator's last
    window accuracy and loss; on the toy, the samples' gold reward and how often silver orders them as gold does."""
    n_gold = sum(gold.get(i) in ("a", "b") for i in keep)
    row = {"gold/used": w.gold_used, "gold/pairs": n_gold, "silver/pairs": len(keep) - n_gold,
           "disc/accuracy": (w.accuracies or [None])[-1], "disc/loss": w.disc_loss, "window": w.number}
    if m.args.gold == "toy":
        rewards = torch.tensor([[toy_reward(item[k]) for k in ("a", "b")] for item in items])  # (P, 2)
        row["gold/reward"] = rewards.mean().item()
        differ = eligible & (rewards[:, 0] != rewards[:, 1])  # (P,)
        if m.args.labels != "gold" and differ.any():
            row["silver/agreement"] = order_accuracy(scores[differ, 0], scores[differ, 1],
                                                     rewards[differ, 0] > rewards[differ, 1])
    return row


def extra_state(m, window):
    """What a D2PO checkpoint holds besides the policy: the window and the discriminator with its optimizer (every
    rank calls it; under torchrun the full states are gathered on rank 0)."""
    disc, disc_optimizer = full_state(m.discriminator, m.disc_optimizer) if m.discriminator else (None, None)
    return {"window": dataclasses.asdict(window), "discriminator": disc, "disc_optimizer": disc_optimizer}


def load_extra_state(m, window, state):
    """extra_state back (under torchrun only rank 0 has read `state`: the rest comes from there)."""
    state = state or {}
    for k, v in on_rank_0(lambda: state["window"]).items():
        setattr(window, k, v)
    if m.discriminator:
        load_model_state(m.discriminator, state.get("discriminator"))
        load_optimizer_state(m.discriminator, m.disc_optimizer, state.get("disc_optimizer"))


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    check_flags(args)  # D2PO's own, and the defaults that follow from other flags
    with start_run(args, argv, __file__) as run:  # torchrun, the output directory checked, Ctrl-C and SIGTERM
        toy, toy_dir = toy_task(args)  # without --model: the toy's SFT model, its pairs' prompts, its annotator
        if toy and args.disc_pretrain == "toy":  # the toy's annotated pairs (the annotator's labels, as gold's)
            args.disc_pretrain = os.path.join(toy_dir, "train_pairs.jsonl")
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        prompts, held_out = load_data(args, tokenizer)
        steps_per_epoch, max_steps = steps_of(args, len(prompts), run.world, "prompts", "distinct training prompts")
        record = run_record(args, tokenizer, disc_model=args.disc_model, disc_pretrain=args.disc_pretrain,
                            gold=args.gold[3:] if args.gold.startswith("rm:") else args.gold)
        if args.resume:
            check_resume(args, record)
        policy, _ = load_policy(run, run.checkpoint)
        reference = frozen(load_model(args.ref_model or args.model, args.dtype, run.device, args.trust_remote_code),
                           args)  # pi_0 for the fresh samples: a frozen copy of the initial weights (the docstring)
        m = setup(args, run, tokenizer, reference)
        pretrain_pairs = [] if m.discriminator is None or args.disc_pretrain == "none" or run.checkpoint else \
            load_pairs(args.disc_pretrain, tokenizer, args, args.dataset_split)  # the starting reward model's data
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record, "d2po")
        held_out_ref = held_out and all_pair_logps(reference, held_out, args, tokenizer.pad_token_id, run.device)
        optimizer, scheduler = make_optimizer(policy, args)
        window = Window(left=args.gold_per_window)
        start_step = 0
        if run.checkpoint:
            start_step, extra = restore(run.checkpoint, policy, optimizer, scheduler)
            load_extra_state(m, window, extra)
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return
        if args.labels == "gold" and window.gold_used >= args.gold_budget and finished(args.output_dir, 0, 0):
            print(f"{args.output_dir}: this run is complete (its gold budget was spent at step {start_step}); "
                  f"nothing to do")
            return
        m.gold_log = GoldLog(os.path.join(args.output_dir, "gold.jsonl")) if is_main() else None  # rank 0 writes it
        save = lambda step: save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step,
                                            extra_state(m, window))
        try:
            with torch_threads(1 if toy else None):
                train(m, run, policy, optimizer, scheduler, save, window, prompts, held_out, held_out_ref, start_step,
                      max_steps, steps_per_epoch, toy and (toy, toy_dir), pretrain_pairs)
        except InputEnded as ended:  # the human labeller's stdin ended: keep the finished steps and every label
            run.signals["stop_after_step"] = False
            step = start_step if ended.step is None else ended.step  # the steps done
            if step > start_step:
                save(step)
            if is_main():
                print(f"\nstdin ended: {m.gold_log.charged} gold labels are in {m.gold_log.path}; the run stopped "
                      f"after step {step}. {resume_command(run) or ''}", file=sys.stderr)
            return
        report(m, window)
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


def train(m, run, policy, optimizer, scheduler, save, window, prompts, held_out, held_out_ref, start_step, max_steps,
          steps_per_epoch, toy, pretrain_pairs):
    """D2PO's loop: the starting discriminator, then each step: sample, score, choose the gold pairs and label them,
    order the pairs, update the policy; a window's gold spent, the discriminator learns it."""
    args, pad = m.args, m.tokenizer.pad_token_id
    if toy:  # the toy's gold reward, length and KL of samples before training
        toy_prompts, before = toy_before(*toy, m.reference, m.tokenizer, args.seed)
    pretrained = pretrain_discriminator(m.discriminator, [(m.to_disc(p, c), m.to_disc(p, r)) for p, c, r in
                                                          pretrain_pairs], held_out, m.to_disc, args, m.disc_pad,
                                        m.device) if pretrain_pairs else {}
    if args.initial_gold and not run.checkpoint:
        initial_gold(m, window, prompts)
    run.log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
    evaluate = held_out and (lambda: evaluate_pairs(policy, held_out, held_out_ref, args, pad, m.device, dpo_loss))
    if start_step == 0 and (held_out or pretrained):
        run.log({"step": 0, **pretrained, **(evaluate() if held_out else {})})
    policy.train()
    bar = training_bar(run, policy, start_step, max_steps, f"d2po ({args.labels})")
    prompts_per_step = args.batch_size * args.grad_accum * run.world  # each rank samples batch_size x grad_accum
    for step in bar:
        epoch, position = divmod(step, steps_per_epoch)  # the prompts follow from the step: resumable
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        batch = [prompts[i] for i in order[position * prompts_per_step:(position + 1) * prompts_per_step].tolist()]
        try:
            row, gold_row = d2po_step(m, run, policy, optimizer, scheduler, window, batch, step)
        except InputEnded as ended:
            ended.step = step
            raise
        if row is None:  # --labels gold, the budget spent: online DPO on gold labels stops here
            if step > 0:
                save(step)
            tqdm.write(f"the gold budget ({args.gold_budget}) is spent: online DPO on gold labels stops after step "
                       f"{step}")
            max_steps = step
            break
        row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                   learning_rate=scheduler.get_last_lr()[0])
        row.update(gold_row)
        bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", gold=window.gold_used,
                        disc_acc=f"{(window.accuracies or [math.nan])[-1]:.2f}")
        end_of_step(run, row, step, max_steps, bar, evaluate, save=lambda: save(step + 1),
                    toy_curve=toy and (lambda: toy[0].evaluate(policy, m.reference, m.tokenizer, toy_prompts,
                                                               seed=args.seed)))
    run.signals["stop_after_step"] = False
    if toy:
        toy_after(toy[0], toy_prompts, before, policy, m.reference, m.tokenizer, args.seed, run.log, max_steps)


def d2po_step(m, run, policy, optimizer, scheduler, window, batch, step):
    """One D2PO step on a batch of prompts [(prompt as given, ids)]: its DPO metrics and its gold metrics, or
    (None, None) when --labels gold has spent its budget (nothing to train on)."""
    args, pad = m.args, m.tokenizer.pad_token_id
    responses_a, responses_b = sample_pairs(policy, m.tokenizer, [ids for _, ids in batch], args,
                                            args.seed * 1000003 + step + 1)  # y_a, y_b ~ pi_theta(. | x)
    groups = [(ids, [a, b]) for (_, ids), a, b in zip(batch, responses_a, responses_b)]
    reference_logps = response_logps(m.reference, groups, pad, m.device, args.sample_batch_size).view(-1, 2)  # (P, 2)
    crash_point("reference")
    items = m.items(batch, responses_a, responses_b)
    eligible = torch.tensor([a != b for a, b in zip(responses_a, responses_b)])  # (P,)
    scores = silver_scores(m, policy, groups, reference_logps)  # (P, 2) s(x, y_a), s(x, y_b)
    margins = scores[:, 0] - scores[:, 1]  # (P,)
    w = copy.deepcopy(window)  # the step's bookkeeping, committed when the step is done
    gold = gold_labels(m, w, margins, eligible, items, groups, scores, step)
    if args.labels == "gold" and not any(label in ("a", "b") for label in gold.values()) \
            and w.gold_used >= args.gold_budget:
        return None, None
    keep, winners = dpo_pairs(margins, gold, eligible, gold_only=args.labels == "gold")  # the gold order, else silver
    step_pairs = [(groups[i][0], groups[i][1][win], groups[i][1][1 - win]) for i, win in zip(keep, winners)]
    kept, first = torch.tensor(keep, dtype=torch.long), torch.tensor(winners, dtype=torch.long)
    step_reference = torch.stack([reference_logps[kept, first], reference_logps[kept, 1 - first]], -1)  # (n, 2)
    row = policy_updates(m, run, policy, optimizer, scheduler, step_pairs, step_reference, step)
    for k, v in dataclasses.asdict(w).items():
        setattr(window, k, v)  # the step is done
    crash_point("step")
    return row, gold_metrics(m, w, items, scores, eligible, keep, gold)


def report(m, window):
    """The run's last lines: gold labels used and the discriminator's accuracy on each new window; the discriminator
    saved beside the policy."""
    args, accuracies = m.args, window.accuracies
    on_disk = f"{m.gold_log.charged} in {m.gold_log.path}" if is_main() else ""
    print(f"gold labels: {window.gold_used} used of --gold_budget {args.gold_budget} ({on_disk})" + (
        f"; discriminator accuracy against gold on each new window, before training on it: {accuracies[0]:.2f} "
        f"(first) -> {accuracies[-1]:.2f} (newest), mean {sum(accuracies) / len(accuracies):.2f} over "
        f"{len(accuracies)} windows" if accuracies else ""))
    if m.discriminator is not None:
        disc_state, _ = full_state(m.discriminator)  # under torchrun: gathered on rank 0
        if is_main():
            with quiet_transformers():
                m.discriminator.save_pretrained(os.path.join(args.output_dir, "discriminator"), state_dict=disc_state)
            m.disc_tokenizer.save_pretrained(os.path.join(args.output_dir, "discriminator"))


def toy_reward(text):
    import toy
    return toy.gold_reward(text)


if __name__ == "__main__":
    main()

