"""DPO: Direct Preference Optimization: Your Language Model is Secretly a Reward Model.
Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. NeurIPS 2023. https://arxiv.org/abs/2305.18290

    h      = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   (summed over tokens)
    L_DPO  = - E[ log sigmoid(beta * h) ]                                                  (Eq. 7)
    cDPO   = - (1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)                (--label_smoothing eps)

Run:
    python dpo.py                                          # built-in toy task, CPU, a few minutes
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out --resume
    torchrun --nproc_per_node=8 dpo.py --model meta-llama/Llama-3.1-8B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out
Under torchrun each process takes --batch_size x --grad_accum pairs of every step (a step is that many times the
number of processes); --ddp keeps a whole copy of the model on each GPU, --fsdp shards it (PyTorch's FSDP2; the
default from 1B parameters). Only rank 0 prints and writes; a run resumes under the same number of processes.

A run owns its --output_dir: args.json records every flag and a fingerprint of each input, and --resume
continues from the newest checkpoint only with the same flags and inputs (it may change --max_steps,
--eval_every, --save_every). Ctrl-C or SIGTERM finishes the step, saves a checkpoint and prints the command
that continues the run; a second one stops at once.

Deviations from the paper and the reference code (eric-mitchell/direct-preference-optimization):
1. The reference log-probs are computed once, before training, with the initial policy (pi = pi_ref at
   step 0), so no second model is held in memory. --ref_model loads a frozen reference model instead.
2. AdamW by default (the paper uses RMSprop: --optimizer rmsprop); linear warm-up, then constant, as in the paper.
3. The LM head runs only on positions that score a response token, in chunks (common.sequence_logps), and each
   pair's prompt is computed once: prompt, chosen and rejected in one sequence, where each response sees the
   prompt and itself (common.grouped_logps; the same log-probs as two separate sequences).
4. On CUDA the default dtype is bf16 for the weights and the optimizer state. With learning rates near
   1e-6 many bf16 updates round away; use --dtype float32 if memory allows.
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

from common import (agree, clip_grad_norm_, crash_point, encode_prompt, encode_response, fingerprint, full_state,
                    gather_objects, gather_shares, grouped_logps, init_distributed, is_main, load_model,
                    load_optimizer_state, load_rows, load_tokenizer, mean_over_ranks, my_share, on_rank_0, parallelize,
                    prompt_head_length, report_dropped, sync_gradients, this_rank, truncate, world_size)


@dataclass
class Args:
    model: str = field(default=None, metadata={"help": "policy to train: hub id or local directory (default: the built-in toy model)"})
    ref_model: str = field(default=None, metadata={"help": "frozen reference model; default: reference log-probs precomputed with the initial policy"})
    dataset: str = field(default=None, metadata={"help": "preference data (prompt/chosen/rejected): hub name, .jsonl/.json/.parquet, or a save_to_disk folder (default: toy)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset to train on"})
    eval_dataset: str = field(default=None, metadata={"help": "held-out preference data; default: hold out --eval_fraction of --dataset"})
    eval_fraction: float = field(default=0.02, metadata={"help": "fraction of --dataset held out when no --eval_dataset is given"})
    max_eval_pairs: int = field(default=512, metadata={"help": "at most this many held-out pairs are evaluated"})
    output_dir: str = field(default=None, metadata={"help": "where checkpoints and metrics go (default: runs/dpo-<time>)"})
    max_steps: int = field(default=None, metadata={"help": "optimizer steps (default: --epochs over the data)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs, when --max_steps is not given"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch (one forward pass of 2 x batch_size rows)"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (paper: 1e-6)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant (paper: 150)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or rmsprop (the paper's)", "choices": ["adamw", "rmsprop"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm (reference code: 10)"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (paper: 0.1; 0.5 for TL;DR)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO)"})
    max_length: int = field(default=512, metadata={"help": "max tokens of prompt + response; the prompt's middle is cut first"})
    max_prompt_length: int = field(default=None, metadata={"help": "a cut prompt keeps at least this many tokens (default max_length // 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of everything random"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on the held-out pairs every N steps"})
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
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128)
positive, at_least_1 = (lambda v: 0 < v < math.inf, "a positive number"), (lambda v: v >= 1, "at least 1")
ARG_CHECKS = dict(batch_size=at_least_1, grad_accum=at_least_1, epochs=at_least_1, eval_every=at_least_1,
                  save_every=at_least_1, max_eval_pairs=at_least_1, max_length=(lambda v: v >= 2, "at least 2"),
                  max_steps=(lambda v: v is None or v >= 1, "at least 1"),
                  max_prompt_length=(lambda v: v is None or v >= 1, "at least 1"),
                  toy_eval_every=(lambda v: v >= 0, "0 or more"),
                  warmup_steps=(lambda v: v >= 0, "0 or more"), weight_decay=(lambda v: 0 <= v < math.inf, "0 or more"),
                  learning_rate=positive, beta=positive, max_grad_norm=positive,
                  eval_fraction=(lambda v: 0 < v < 1, "between 0 and 1"),
                  label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))
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
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_logps(model, pairs, pad_token_id, device):
    """Summed response log-probs of chosen and rejected, in one forward pass, each prompt computed once."""
    logps, _ = grouped_logps(model, [(p, [c, r]) for p, c, r in pairs], pad_token_id, device)  # (2B,): c, r, c, r...
    return logps[0::2], logps[1::2]


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """TRL's metric names, as one tensor per name (means over the pairs)."""
    return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(), "logps/rejected": policy_rejected_logps.detach().mean()}


# ---------------------------------------------------------------- data
def load_pairs(source, tokenizer, args, split="train"):
    """Tokenised (prompt_ids, chosen_ids, rejected_ids) triples; unusable rows are dropped and counted."""
    rows = load_rows(source, ["prompt", "chosen", "rejected"], split)
    text = lambda v: v if isinstance(v, str) else "".join(m["content"] for m in v)
    dropped = {"empty prompt or response": [], "chosen identical to rejected": [],
               "prompt alone longer than --max_length": []}
    pairs, n_cut = [], 0
    for i, row in enumerate(tqdm(rows, desc=f"tokenizing {source}", disable=len(rows) < 10000), 1):
        if not all(text(row[k]).strip() for k in ("prompt", "chosen", "rejected")):
            dropped["empty prompt or response"].append(i)
        elif row["chosen"] == row["rejected"]:
            dropped["chosen identical to rejected"].append(i)
        else:
            prompt = encode_prompt(tokenizer, row["prompt"])
            if len(prompt) >= args.max_length:
                dropped["prompt alone longer than --max_length"].append(i)
                continue
            responses = [encode_response(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
            prompt, (chosen, rejected), cut = truncate(prompt, responses, args.max_length, args.max_prompt_length,
                                                       prompt_head_length(tokenizer, row["prompt"], prompt))
            pairs.append((prompt, chosen, rejected))
            n_cut += cut
    report_dropped(source, dropped, len(rows))
    if n_cut:
        print(f"{source}: truncated {n_cut} of {len(pairs)} pairs to --max_length {args.max_length}")
    return pairs


def load_data(args, tokenizer):
    """Training and held-out pairs: --eval_dataset, or --eval_fraction of --dataset held out by a seeded shuffle."""
    train = load_pairs(args.dataset, tokenizer, args, args.dataset_split)
    if args.eval_dataset:
        held_out = load_pairs(args.eval_dataset, tokenizer, args, "test")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, min(args.max_eval_pairs, int(len(train) * args.eval_fraction)))
        held_out, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    print(f"{len(train)} training pairs, {len(held_out[:args.max_eval_pairs])} held-out pairs")
    return train, held_out[:args.max_eval_pairs]


@torch.no_grad()
def all_pair_logps(model, pairs, args, pad_token_id, device, desc=None):
    """(N, 2) summed log-probs of chosen and rejected of every pair, in eval mode. Under torchrun each rank
    computes its share and every rank gets the whole."""
    share, out, was_training = my_share(len(pairs)), [torch.zeros(0, 2)], model.training
    model.eval()
    for s in tqdm(range(0, len(share), 2 * args.batch_size), desc=desc, disable=desc is None):
        chunk = [pairs[i] for i in share[s:s + 2 * args.batch_size]]
        out.append(torch.stack(pair_logps(model, chunk, pad_token_id, device), -1).cpu())
        crash_point("reference")
    model.train(was_training)
    return gather_shares(torch.cat(out), len(pairs))


def reference_cache(args, policy, splits, record, pad_token_id, device):
    """Reference log-probs of every pair under the initial policy (deviation 1), computed once and kept in the run
    directory with the record of what they were computed from, so a resumed run reuses them (and never reuses
    another run's)."""
    path = os.path.join(args.output_dir, "reference_logps.pt")
    fixed = {k: v for k, v in record["args"].items() if k not in RESUME_MAY_CHANGE}, record["inputs"]
    if os.path.exists(path):
        cache = torch.load(path)
        if cache["record"] != fixed:
            sys.exit(f"error: {path} was computed for other flags or inputs; remove it to compute it again")
        return cache
    cache = {name: all_pair_logps(policy, pairs, args, pad_token_id, device, "reference log-probs")
             for name, pairs in splits.items()}
    if is_main():
        torch.save({**cache, "record": fixed}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def evaluate(policy, pairs, reference_logps, args, pad_token_id, device):
    """Mean DPO metrics on held-out pairs, TRL's names with the eval_ prefix; the policy in eval mode."""
    policy_logps = all_pair_logps(policy, pairs, args, pad_token_id, device).unbind(-1)
    metrics = dpo_metrics(*dpo_loss(*policy_logps, *reference_logps.unbind(-1), args.beta, args.label_smoothing),
                          *policy_logps)
    return {f"eval_{k}": v.item() for k, v in metrics.items()}


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
        if args.model is None:  # the built-in toy task
            import toy
            toy_dir = toy.ensure_built()
            args.model, args.dataset = os.path.join(toy_dir, "sft"), os.path.join(toy_dir, "train_pairs.jsonl")
            args.eval_dataset = args.eval_dataset or os.path.join(toy_dir, "test_pairs.jsonl")
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        train, held_out = load_data(args, tokenizer)
        pairs_per_step = args.batch_size * args.grad_accum * world  # each rank batch_size x grad_accum of them
        steps_per_epoch = len(train) // pairs_per_step
        if steps_per_epoch == 0:
            sys.exit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} processes = "
                     f"{pairs_per_step} pairs per step, but {args.dataset} gives only {len(train)} training pairs")
        max_steps = args.max_steps or args.epochs * steps_per_epoch
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer)
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
            print(f"{world} processes, {parallel.upper()}: {args.batch_size * args.grad_accum} pairs a process a step")

        # the reference: a frozen model, or log-probs precomputed with the initial policy and kept with the run
        if reference is not None:
            reference.eval().requires_grad_(False)
            parallelize(reference, args, trainable=False)
            ref = lambda chunk, idx, split: pair_logps(reference, chunk, tokenizer.pad_token_id, device)
            held_out_ref = all_pair_logps(reference, held_out, args, tokenizer.pad_token_id, device)
        else:
            if checkpoint and not os.path.exists(os.path.join(args.output_dir, "reference_logps.pt")):
                sys.exit(f"error: {args.output_dir} has checkpoints but no reference_logps.pt; it cannot be resumed")
            cache = reference_cache(args, policy, {"train": train, "eval": held_out}, record, tokenizer.pad_token_id, device)
            ref = lambda chunk, idx, split: cache[split][idx].to(device).unbind(-1)
            held_out_ref = cache["eval"]

        # optimizer, linear warm-up then constant (paper App. B)
        if args.optimizer == "adamw":
            optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                          fused=True)  # one kernel per step: 1.1-1.2x faster steps at vocab 128k (bench/)
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
        bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="dpo")
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[rank::world]
            sums = {}
            for micro in range(args.grad_accum):
                idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
                sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
                chunk = [train[i] for i in idx]
                policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, tokenizer.pad_token_id, device)
                reference_chosen_logps, reference_rejected_logps = ref(chunk, idx, "train")
                losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                                    reference_chosen_logps, reference_rejected_logps,
                                                                    args.beta, args.label_smoothing)
                (losses.mean() / args.grad_accum).backward()
                metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
                sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
            grad_norm = clip_grad_norm_(policy, args.max_grad_norm)
            values = mean_over_ranks(torch.stack([*sums.values(), grad_norm.float()])).tolist()  # one host sync
            row = dict(zip([*sums, "grad_norm"], values))
            if not all(map(math.isfinite, values)):
                stop(f"non-finite loss or gradient at step {step + 1} ({row})", args.output_dir)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            crash_point("step")
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3), learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == max_steps:
                row.update(evaluate(policy, held_out, held_out_ref, args, tokenizer.pad_token_id, device))
                tqdm.write(f"step {step + 1}: eval loss {row['eval_loss']:.4f}, "
                           f"accuracy {row['eval_rewards/accuracies']:.3f}, margin {row['eval_rewards/margins']:.3f}")
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
