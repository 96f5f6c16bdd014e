"""DPO: Direct Preference Optimization: Your Language Model is Secretly a Reward Model.
Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. NeurIPS 2023. https://arxiv.org/abs/2305.18290  Its page: docs/dpo.md

    h      = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   (summed over tokens)
    L_DPO  = - E[ log sigmoid(beta * h) ]                                                  (Eq. 7)
    cDPO   = - (1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)                (--label_smoothing eps)

Run:
    python dpo.py                                          # built-in toy task, CPU, a few minutes
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized --output_dir out --resume
    torchrun --nproc_per_node=8 dpo.py --model meta-llama/Llama-3.1-8B-Instruct \
        --dataset trl-lib/ultrafeedback_binarized --output_dir out
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import (AT_LEAST_1, check_resume, claim_output_dir, dpo_metrics, end_of_step, evaluate_pairs, finished,
                    flag, load_model, load_pair_data, load_policy, load_tokenizer, make_optimizer, on_rank_0,
                    open_metrics, pair_logps, pair_references, parse_flags, restore, run_record, RunArgs,
                    save_checkpoint, save_final, start_run, steps_of, sync_gradients, toy_after, toy_before, toy_task,
                    training_bar, update)


@dataclass
class Args(RunArgs):  # the flags every script has (common.RunArgs), then DPO's own
    max_eval_pairs: int = flag(512, "at most this many held-out pairs are evaluated")
    label_smoothing: float = flag(0.0, "cDPO label smoothing eps in [0, 0.5) (0 = plain DPO)")


# The toy task needs a larger step size and smaller batches than a pretrained LLM; used when --model is not given.
TOY_DEFAULTS = dict(learning_rate=1e-4, batch_size=16, grad_accum=1, warmup_steps=10, epochs=2, eval_every=40,
                    save_every=100, max_length=128)
ARG_CHECKS = dict(max_eval_pairs=AT_LEAST_1, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))


def parse_args(argv=None):
    """The flags, over the toy's defaults when --model is not given, each one checked (common.parse_flags)."""
    return parse_flags(Args, TOY_DEFAULTS, ARG_CHECKS, argv, __doc__.split("\n")[0])


# ---------------------------------------------------------------- ALGO LOGIC: the loss
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0):
    """Per-pair DPO loss (Eq. 7 of arXiv 2305.18290; cDPO if label_smoothing > 0) and implicit rewards."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) u(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) u(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing  # (B,)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_step(policy, train, indices, reference, args, pad_token_id, device):
    """One optimizer step's backward passes: --grad_accum micro-batches of --batch_size pairs, the loss averaged
    over the step; `reference(chunk, idx)` gives the pairs' reference log-probs. Returns the step's mean metrics."""
    sums = {}
    for micro in range(args.grad_accum):
        idx = indices[micro * args.batch_size:(micro + 1) * args.batch_size]
        sync_gradients(policy, micro == args.grad_accum - 1)  # under torchrun: once a step
        chunk = [train[i] for i in idx]
        policy_chosen_logps, policy_rejected_logps = pair_logps(policy, chunk, pad_token_id, device)
        reference_chosen_logps, reference_rejected_logps = reference(chunk, idx)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                            reference_chosen_logps, reference_rejected_logps,
                                                            args.beta, args.label_smoothing)
        (losses.mean() / args.grad_accum).backward()
        metrics = dpo_metrics(losses.detach(), chosen_rewards, rejected_rewards, policy_chosen_logps,
                              policy_rejected_logps)
        sums = {k: sums.get(k, 0) + v / args.grad_accum for k, v in metrics.items()}
    return sums


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag checked; nothing read or written yet
    with start_run(args, argv, __file__) as run:  # torchrun, the output directory checked, Ctrl-C and SIGTERM
        toy, toy_dir = toy_task(args)  # without --model: the toy's SFT model and annotated pairs
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        pad = tokenizer.pad_token_id
        train, held_out = load_pair_data(args, tokenizer)
        steps_per_epoch, max_steps = steps_of(args, len(train), run.world)
        pairs_per_step = args.batch_size * args.grad_accum * run.world  # each rank batch_size x grad_accum of them
        if toy is None and args.warmup_steps > max_steps:
            print(f"warning: --warmup_steps {args.warmup_steps} is longer than the run ({max_steps} steps): the "
                  f"learning rate never reaches --learning_rate {args.learning_rate}")
        record = run_record(args, tokenizer)
        if args.resume:
            check_resume(args, record)
        policy, parallel = load_policy(run, run.checkpoint)
        reference = None if args.ref_model is None else load_model(args.ref_model, args.dtype, run.device,
                                                                   args.trust_remote_code)
        if not args.resume:  # only now: a run that fails on its inputs leaves nothing behind
            args.output_dir = on_rank_0(claim_output_dir, args, record, "dpo")
        if parallel:
            print(f"{run.world} processes, {parallel.upper()}: {args.batch_size * args.grad_accum} pairs a process "
                  f"a step")
        reference_logps, held_out_ref = pair_references(args, run, policy, reference, train, held_out, record, pad)
        optimizer, scheduler = make_optimizer(policy, args)
        start_step = restore(run.checkpoint, policy, optimizer, scheduler)[0] if run.checkpoint else 0
        if finished(args.output_dir, start_step, max_steps):
            print(f"{args.output_dir}: this run is complete ({start_step} steps); nothing to do")
            return
        if toy:  # the toy's gold reward, length and KL of samples before training
            toy_reference = load_model(args.ref_model or args.model, args.dtype, run.device).eval()
            toy_prompts, before = toy_before(toy, toy_dir, toy_reference, tokenizer, args.seed)
        evaluate = lambda: evaluate_pairs(policy, held_out, held_out_ref, args, pad, run.device, dpo_loss)

        # ---------------------------------------------------------------- the training loop
        run.log = open_metrics(args.output_dir, start_step)  # forgets what a killed run logged after its checkpoint
        if start_step == 0:
            run.log({"step": 0, **evaluate()})
        policy.train()
        bar = training_bar(run, policy, start_step, max_steps, "dpo")
        for step in bar:
            epoch, position = divmod(step, steps_per_epoch)  # the data position follows from the step: resumable
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
            indices = order[position * pairs_per_step:(position + 1) * pairs_per_step].tolist()[run.rank::run.world]
            sums = dpo_step(policy, train, indices, reference_logps, args, pad, run.device)
            row = update(run, policy, optimizer, scheduler, sums, step)  # clip, stop on NaN, the optimizer's step
            row.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                       learning_rate=scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            save = lambda: save_checkpoint(args.output_dir, policy, tokenizer, optimizer, scheduler, step + 1)
            end_of_step(run, row, step, max_steps, bar, evaluate, save,
                        toy_curve=toy and (lambda: toy.evaluate(policy, toy_reference, tokenizer, toy_prompts,
                                                                seed=args.seed)))
        run.signals["stop_after_step"] = False
        if toy:
            toy_after(toy, toy_prompts, before, policy, toy_reference, tokenizer, args.seed, run.log, max_steps)
        save_final(args.output_dir, policy, tokenizer)  # last: its presence marks the run complete


if __name__ == "__main__":
    main()
