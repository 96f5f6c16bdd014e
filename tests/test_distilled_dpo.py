"""Distilled DPO: the distillation loss, the min over the family, the Bradley-Terry teachers and the calibration
against closed forms and plain implementations; the toy's relabelled pairs; kills inside each stage; the
teachers' bad input. The shared checks (kills in training, SIGTERM, refused resumes, bad data) are in test_runs.py."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import distilled_dpo as ddpo
import toy
from common import collate, sequence_logps
from conftest import ROOT, tiny_llama


# ---------------------------------------------------------------- the losses
PAIRS = [([5, 6, 7], [10, 11, 0], [12, 0]), ([5, 9], [13, 14, 15, 0], [16, 17, 0]), ([8], [20, 0], [21, 22, 0])]


def test_distillation_loss_and_gradient_vanish_where_the_implicit_margins_equal_the_teachers():
    beta, targets = 0.5, torch.tensor([[1.5], [-0.75], [0.25]], dtype=torch.float64)  # (B, 1)
    model = tiny_llama(seed=1, dtype=torch.float64)
    params = list(model.parameters())
    policy_chosen, policy_rejected = ddpo.pair_logps(model, PAIRS, 1, "cpu")
    # references placed so that beta (u_w - u_l) = Delta exactly: u_w = Delta / beta, u_l = 0
    reference_chosen = policy_chosen.detach() - targets[:, 0] / beta
    reference_rejected = policy_rejected.detach()
    for family in (targets, torch.cat([targets + 3.0, targets, targets - 2.0], -1)):  # alone, and among worse teachers
        for ensemble_min in ("batch", "example"):
            losses, teacher, _, _ = ddpo.distill_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                                      family, beta, ensemble_min)
            assert losses.abs().max().item() < 1e-20
            assert teacher.tolist() == [0 if family.shape[1] == 1 else 1] * 3
            grads = torch.autograd.grad(losses.mean(), params, allow_unused=True, retain_graph=True)
            assert max(g.abs().max().item() for g in grads if g is not None) < 1e-12
    # away from the target the gradient is not zero (the check above can fail)
    losses, _, _, _ = ddpo.distill_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, targets + 1, beta)
    grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) > 1e-4


def test_distillation_loss_and_gradient_against_the_closed_form():
    """L = (Delta - beta h)^2, dL/dlog pi(y_1) = -2 beta (Delta - beta h) = -dL/dlog pi(y_2); with Delta = 1/2 it is
    beta^2 times IPO's (h - 1/(2 beta))^2."""
    beta = 0.3
    pw, pl = torch.tensor([-3.0, -7.0], requires_grad=True), torch.tensor([-5.0, -6.5], requires_grad=True)
    rw, rl, delta = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -6.0]), torch.tensor([[0.8], [-1.1]])
    losses, _, chosen_rewards, rejected_rewards = ddpo.distill_loss(pw, pl, rw, rl, delta, beta)
    for i in range(2):
        h = (pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item())
        expected = (delta[i, 0].item() - beta * h) ** 2
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen_rewards[i].item() - rejected_rewards[i].item() == pytest.approx(beta * h, rel=1e-6)
    grad_w, grad_l = torch.autograd.grad(losses.sum(), [pw, pl])
    for i in range(2):
        h = (pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item())
        assert grad_w[i].item() == pytest.approx(-2 * beta * (delta[i, 0].item() - beta * h), rel=1e-5)
        assert grad_l[i].item() == pytest.approx(2 * beta * (delta[i, 0].item() - beta * h), rel=1e-5)
    ipo, _, _, _ = ddpo.distill_loss(pw, pl, rw, rl, torch.full((2, 1), 0.5), beta)
    for i in range(2):
        h = (pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item())
        assert ipo[i].item() == pytest.approx(beta ** 2 * (h - 1 / (2 * beta)) ** 2, rel=1e-5)


def test_the_min_over_the_family_picks_the_best_matching_teacher():
    beta = 1.0
    zeros = torch.zeros(4)
    h = torch.tensor([1.0, -2.0, 0.5, 3.0])  # implicit margins beta h
    family = torch.tensor([[1.2, 0.0, 5.0], [-2.5, -1.0, 0.0], [0.0, 0.6, 0.4], [9.0, 2.0, 3.1]])  # (B, K)
    # per batch: the teacher whose mean squared error over the batch is least, by a plain loop
    mse = [sum((family[b, k].item() - h[b].item()) ** 2 for b in range(4)) / 4 for k in range(3)]
    best = min(range(3), key=mse.__getitem__)
    losses, teacher, _, _ = ddpo.distill_loss(h, zeros, zeros, zeros, family, beta, "batch")
    assert teacher.tolist() == [best] * 4 and best == 1  # constructed so: teacher 1 fits best on average
    assert losses.mean().item() == pytest.approx(mse[best], rel=1e-6)
    # per pair: each pair's closest teacher
    losses, teacher, _, _ = ddpo.distill_loss(h, zeros, zeros, zeros, family, beta, "example")
    nearest = [min(range(3), key=lambda k: abs(family[b, k].item() - h[b].item())) for b in range(4)]
    assert teacher.tolist() == nearest == [0, 0, 2, 2]
    assert losses.tolist() == pytest.approx([(family[b, k].item() - h[b].item()) ** 2 for b, k in enumerate(nearest)], rel=1e-6)


def test_forward_kl_gradient_is_sft_on_the_reference_samples():
    model = tiny_llama(seed=2)
    params = list(model.parameters())
    rows = [([5, 6], [10, 11, 0]), ([7], [12, 13, 14, 0])]
    policy = sequence_logps(model, collate(rows, 1))[0]
    reference = policy.detach() + torch.tensor([0.3, -0.2])
    kl = ddpo.forward_kl(policy, reference)
    assert kl.tolist() == pytest.approx([0.3, -0.2], abs=1e-6)
    got = torch.autograd.grad(kl.mean(), params, allow_unused=True)
    expected = torch.autograd.grad(-sequence_logps(model, collate(rows, 1))[0].mean(), params, allow_unused=True)  # SFT
    for a, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(a, e)


# ---------------------------------------------------------------- the teachers
def test_bradley_terry_loss_and_accuracy_against_a_plain_implementation():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    losses, correct = ddpo.bradley_terry_loss(chosen, rejected)
    for c, r, loss, ok in zip(chosen.tolist(), rejected.tolist(), losses.tolist(), correct.tolist()):
        assert loss == pytest.approx(math.log(1 + math.exp(-(c - r))), rel=1e-5)
        assert ok == (1.0 if c > r else 0.0)


def test_pair_scores_read_each_row_at_its_last_token_whatever_the_padding():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=1, pad_token_id=1, eos_token_id=0, bos_token_id=None)
    model = LlamaForSequenceClassification(config).eval()
    chosen, rejected = ddpo.pair_reward_scores(model, PAIRS, 1, "cpu")
    with torch.no_grad():  # one sequence at a time, no padding: the score at its last position
        alone = lambda p, r: model(torch.tensor([p + r])).logits[0, 0].item()
        assert chosen.tolist() == pytest.approx([alone(p, c) for p, c, _ in PAIRS], abs=1e-5)
        assert rejected.tolist() == pytest.approx([alone(p, r) for p, _, r in PAIRS], abs=1e-5)


def test_a_reward_model_learns_a_separable_toy_set(toy_dir, tmp_path):
    rng = random.Random(0)
    good, bad = toy.POSITIVE[:10], toy.NEGATIVE[:10]
    rows = [{"prompt": f"{rng.choice(toy.SUBJECTS)} was", "chosen": f" {rng.choice(good)} and {rng.choice(good)} .",
             "rejected": f" {rng.choice(bad)} and {rng.choice(bad)} ."} for _ in range(96)]
    data = tmp_path / "separable.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ddpo.parse_args(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(data), "--batch_size", "8",
                            "--grad_accum", "1", "--rm_learning_rate", "1e-3", "--rm_epochs", "3",
                            "--warmup_steps", "2", "--objective", "distill"])
    entries = [(str(data), i, r) for i, r in enumerate(rows)]
    train, held_out = entries[:64], entries[64:]
    ddpo.train_reward_model(0, args, train, "cpu", str(tmp_path / "rm"))
    margins, = ddpo.model_margins(str(tmp_path / "rm"), [held_out], args, "cpu")
    assert (margins > 0).double().mean().item() == 1.0  # every held-out pair ranked right
    assert os.path.exists(tmp_path / "rm" / "config.json") and os.path.exists(tmp_path / "rm" / "tokenizer.json")


def test_temperature_scaling_minimises_the_held_out_log_loss():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, generator=g, dtype=torch.float64) * 2 + 0.8  # true log-odds that the first response wins
    wins = torch.rand(400, generator=g, dtype=torch.float64) < torch.sigmoid(z)
    margins = torch.where(wins, z, -z) * 4.0  # an overconfident teacher, oriented winner minus loser
    tau = ddpo.fit_temperature(margins)
    log_loss = lambda t: -torch.nn.functional.logsigmoid(margins / t).mean().item()
    grid = [math.exp(x / 200) for x in range(-800, 1200)]  # a plain scan over tau in [e^-4, e^6]
    best = min(grid, key=log_loss)
    assert tau == pytest.approx(best, rel=0.01) and 3.0 < tau < 5.5  # about the 4x it was inflated by
    assert log_loss(tau) <= log_loss(best) + 1e-9
    assert ddpo.fit_temperature(-margins.abs()) == math.inf  # worse than chance: nothing to distill
    separable = margins.abs() + 0.1
    assert (separable / ddpo.fit_temperature(separable)).mean().item() == pytest.approx(10.0)  # capped


def test_calibrated_margins_are_the_raw_ones_divided_by_the_fitted_temperature():
    """compute_margins, which applies tau to the margins the loss reads: Delta / tau, for one teacher 5 times too
    confident and one 5 times too timid, on the training and the held-out pairs (tau from the training pairs)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(500, generator=g, dtype=torch.float64) * 2 + 0.8  # true log-odds that the first response wins
    oriented = torch.where(torch.rand(500, generator=g, dtype=torch.float64) < torch.sigmoid(z), z, -z)
    columns = {"over": oriented * 5.0, "under": oriented * 0.2}
    rows = [("pairs.jsonl", i, {k: v[i].item() for k, v in columns.items()}) for i in range(500)]
    train_rows, held_out_rows = rows[:400], rows[400:]
    args = ddpo.parse_args(["--objective", "ensemble", "--margin_column", "over,under"])
    assert args.calibration == "temperature"  # the default
    out = ddpo.compute_margins(args, [("column", "over"), ("column", "under")], train_rows, held_out_rows, "cpu")
    for k, name in enumerate(columns):
        raw = columns[name]
        log_loss = lambda t: -torch.nn.functional.logsigmoid(raw[:400] / t).mean().item()
        tau = min((math.exp(x / 500) for x in range(-2000, 2000)), key=log_loss)  # a plain scan over tau in [e^-4, e^4]
        assert (3.5 < tau < 7.0) if name == "over" else (0.14 < tau < 0.29)  # far from 1: a wrong use shows
        torch.testing.assert_close(out["train"][:, k].double(), raw[:400] / tau, rtol=5e-3, atol=1e-6)
        torch.testing.assert_close(out["eval"][:, k].double(), raw[400:] / tau, rtol=5e-3, atol=1e-6)
        torch.testing.assert_close(out["raw_train"][:, k], raw[:400])  # the raw margins are kept as they came


# ---------------------------------------------------------------- the toy's biased annotators
def test_relabelled_toy_pairs_prefer_longer_answers_more_often_as_the_bias_grows(toy_dir, tmp_path):
    shutil.copy(os.path.join(toy_dir, "train_pairs.jsonl"), tmp_path / "train_pairs.jsonl")
    built = [json.loads(line) for line in open(tmp_path / "train_pairs.jsonl")]
    longer, gold = [], []
    for bias in (0.0, 1.0, 3.0):
        path = toy.relabelled_pairs(str(tmp_path), bias, seed=0)
        rows = [json.loads(line) for line in open(path)]
        assert [(r["prompt"], {r["chosen"], r["rejected"]}) for r in rows] == [(r["prompt"], {r["chosen"], r["rejected"]})
                                                                            for r in built]  # the same samples
        assert all(r["score_chosen"] == toy.gold_reward(r["chosen"]) for r in rows)  # the scores follow their texts
        longer.append(sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in rows) / len(rows))
        gold.append(sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows))
    assert longer[0] < longer[1] < longer[2] and longer[2] > 0.8
    assert gold[0] > gold[1] > gold[2]
    built_gold = sum(r["score_chosen"] > r["score_rejected"] for r in built) / len(built)
    assert gold[0] == pytest.approx(built_gold, abs=0.04)  # bias 0: the toy's own annotator, redrawn
    again = open(toy.relabelled_pairs(str(tmp_path), 1.0, seed=0)).read()
    os.remove(toy.relabelled_pairs(str(tmp_path), 1.0, seed=0))
    assert open(toy.relabelled_pairs(str(tmp_path), 1.0, seed=0)).read() == again  # deterministic from the seed
    assert open(toy.relabelled_pairs(str(tmp_path), 1.0, seed=1)).read() != again
    assert sorted(os.listdir(tmp_path))[-1] == "train_pairs.jsonl"  # the built file is untouched beside them
    assert [json.loads(line) for line in open(tmp_path / "train_pairs.jsonl")] == built


# ---------------------------------------------------------------- the stages: kills inside each, resumes, caches
def run(args, crash_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DPO_CRASH_AT", None)
    env.update({"DPO_CRASH_AT": crash_at} if crash_at else {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "distilled_dpo.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def setup(toy_dir, tmp_path_factory):
    """40 toy pairs (39 to train on: 9 steps of 4 an epoch, for the policy and for each reward model), and the flags."""
    tmp = tmp_path_factory.mktemp("distilled")
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        (tmp / "pairs.jsonl").write_text("".join(f.readlines()[:40]))
    sft = os.path.join(toy_dir, "sft")
    flags = lambda out, *extra: ["--model", sft, "--dataset", str(tmp / "pairs.jsonl"), "--output_dir", str(out),
                                 "--batch_size", "4", "--grad_accum", "1", "--learning_rate", "1e-3", "--warmup_steps", "2",
                                 "--eval_every", "4", "--save_every", "3", "--max_steps", "8", "--rm_learning_rate", "1e-3",
                                 *extra]
    return dict(tmp=tmp, sft=sft, flags=flags)


def stage_files(out):
    return {p: os.stat(p).st_mtime_ns for p in out.rglob("*") if p.is_file()
            and (p.name in ("margins.pt", "teachers.json", "reference_logps.pt", "reference_samples.pt")
                 or p.parent.name.startswith("reward_model_") and not p.parent.name.endswith(".tmp"))}


def test_kills_inside_each_stage_resume_to_the_same_weights_without_redoing_finished_stages(setup):
    family = ["--objective", "ensemble", "--num_reward_models", "2", "--gamma", "0.5"]  # all three stages
    baseline = run(setup["flags"](setup["tmp"] / "baseline", *family))
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    expected = load_file(str(setup["tmp"] / "baseline" / "model.safetensors"))
    # One run killed again and again: reward model 0 takes 9 steps, so reward_model:12 is inside reward model 1
    # (stage 1); each teacher's margins take 5 + 1 batches, so margins:8 is inside teacher 1's (stage 2); sample:1
    # is inside the reference samples (stage 3; test_runs.py kills the reference pass and the training).
    out, done = setup["tmp"] / "killed", {}
    for point, finished in (("reward_model:12", "reward_model_0"), ("margins:8", "reward_model_1"),
                            ("sample:1", "margins.pt"), (None, "reference_samples.pt")):
        result = run(setup["flags"](out, *family, *(["--resume"] if done else [])), crash_at=point)
        assert result.returncode == (-signal.SIGKILL if point else 0), (point, result.stderr[-2000:])
        assert done == {p: os.stat(p).st_mtime_ns for p in done}, point  # nothing finished was written again
        done = stage_files(out)
        assert any(finished in str(p) for p in done), (point, done)
    assert not (out / "reward_model_1.tmp").exists()
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bitwise on the CPU
    # teachers.json: each teacher's held-out accuracy, on its out-of-bag pairs
    teachers = json.load(open(setup["tmp"] / "baseline" / "teachers.json"))
    assert [t["teacher"] for t in teachers] == [0, 1] and all(t["held_out"] == "out-of-bag" for t in teachers)
    margins = torch.load(setup["tmp"] / "baseline" / "margins.pt", weights_only=False)
    for k, t in enumerate(teachers):
        _, oob = ddpo.bootstrap(39, 0, k)
        assert t["held_out_pairs"] == len(oob)
        assert t["held_out_accuracy"] == pytest.approx((margins["raw_train"][oob, k] > 0).double().mean().item())
    # a given reward model is the same teacher: distilling reward_model_0 reproduces its margins, trains none
    given = setup["tmp"] / "given"
    ddpo.main(setup["flags"](given, "--objective", "distill", "--reward_models",
                             str(setup["tmp"] / "baseline" / "reward_model_0"), "--max_steps", "1"))
    torch.testing.assert_close(torch.load(given / "margins.pt", weights_only=False)["raw_train"][:, 0],
                               margins["raw_train"][:, 0], rtol=1e-5, atol=1e-5)
    assert not any(name.startswith("reward_model_") for name in os.listdir(given))


def test_pessimistic_dpo_samples_once_and_its_kl_starts_at_zero(setup):
    out = setup["tmp"] / "pdpo"
    ddpo.main(setup["flags"](out, "--objective", "pessimistic_dpo", "--gamma", "0.5"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    first = next(r for r in rows if "kl/forward" in r)
    assert first["step"] == 1 and abs(first["kl/forward"]) < 1e-3  # pi = pi_ref before the first update
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["kl/forward"], abs=1e-4)
    assert rows[-1]["kl/forward"] > 0.01  # and the policy moves away from the reference's samples
    samples = torch.load(out / "reference_samples.pt", weights_only=False)
    assert len(samples["prompts"]) == len({tuple(p) for p in samples["prompts"]})  # one sample a distinct prompt
    assert not os.path.exists(out / "margins.pt")  # no teachers


def test_a_run_with_a_frozen_reference_model_resumes(setup):
    """With --ref_model there is no reference_logps.pt: a checkpoint alone must be enough to continue."""
    out = setup["tmp"] / "frozen_reference"
    flags = setup["flags"](out, "--objective", "dpo", "--ref_model", setup["sft"], "--max_steps", "3")
    ddpo.main(flags)
    assert (out / "checkpoint-3").exists() and not (out / "reference_logps.pt").exists()
    ddpo.main(flags[:-2] + ["--max_steps", "6", "--resume"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "grad_norm" in r] == [1, 2, 3, 4, 5, 6]


def test_a_margin_column_is_the_teacher_row_for_row(setup):
    rows = [json.loads(line) for line in open(setup["tmp"] / "pairs.jsonl")]
    for r in rows:
        r["m"] = r["score_chosen"] - r["score_rejected"] + 0.125
    data = setup["tmp"] / "with_margins.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = setup["tmp"] / "column"
    flags = setup["flags"](out, "--objective", "distill", "--margin_column", "m", "--calibration", "none", "--max_steps", "1")
    flags[flags.index("--dataset") + 1] = str(data)
    ddpo.main(flags)
    train, _, train_rows, _ = ddpo.load_data(ddpo.parse_args(flags), ddpo.load_tokenizer(setup["sft"]))
    cache = torch.load(out / "margins.pt", weights_only=False)
    assert cache["train"][:, 0].tolist() == pytest.approx([row["m"] for _, _, row in train_rows])  # the split's order
    args = ddpo.parse_args(flags)
    args.calibration = "standardize"
    standardized = ddpo.compute_margins(args, [("column", "m")], train_rows, train_rows[:2], "cpu")
    assert standardized["train"][:, 0].std().item() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- the teachers' bad input
def test_bad_teachers_stop_with_one_line_before_anything_is_written(setup):
    rows = [json.loads(line) for line in open(setup["tmp"] / "pairs.jsonl")][:8]
    with_nan = setup["tmp"] / "nan.jsonl"
    with_nan.write_text("".join(json.dumps({**r, "m": float("nan") if i == 5 else 1.0}) + "\n" for i, r in enumerate(rows)))
    with_text = setup["tmp"] / "text.jsonl"
    with_text.write_text("".join(json.dumps({**r, "m": "high" if i == 2 else 1.0}) + "\n" for i, r in enumerate(rows)))
    cases = {("--objective", "distill", "--reward_models", setup["sft"]): [setup["sft"], "not a reward model", "LlamaForCausalLM"],
             ("--objective", "distill", "--reward_models", str(setup["tmp"] / "nowhere")): ["nowhere: no such directory"],
             ("--objective", "distill", "--margin_column", "m", "--dataset", str(with_nan)): ["nan.jsonl: line 6: field 'm'", "finite"],
             ("--objective", "distill", "--margin_column", "m", "--dataset", str(with_text)): ["text.jsonl: line 3: field 'm'"],
             ("--objective", "distill", "--margin_column", "score"): ["line ", "field 'score'", "None"],
             ("--objective", "distill", "--num_reward_models", "2"): ["distills one reward model, got 2"],
             ("--objective", "dpo", "--gamma", "0.1"): ["--objective pessimistic_dpo"],
             ("--objective", "pessimistic_dpo", "--gamma", "0"): ["needs --gamma > 0"],
             ("--objective", "dpo", "--reward_models", "a,b"): ["uses no reward model"],
             ("--length_bias", "1"): ["--length_bias relabels the toy"],
             ("--num_reward_models", "0"): ["--num_reward_models must be at least 1"],
             ("--reward_model_init", str(setup["tmp"] / "nowhere")): ["nowhere: no such directory"]}
    for extra, expected in cases.items():
        out = setup["tmp"] / "never"
        flags = setup["flags"](out)
        given = dict(zip(flags[::2], flags[1::2]))
        given.update(dict(zip(extra[::2], extra[1::2])))
        with pytest.raises(SystemExit) as stopped:
            ddpo.main([a for kv in given.items() for a in kv])
        message = stopped.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (extra, message)
        for part in expected:
            assert part in message, (extra, message)
        assert not out.exists(), extra
