"""DPO: the loss and its gradient against the paper, and dpo.py's behaviour end to end."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dpo
from common import sequence_logps, collate
from conftest import ROOT, tiny_llama


def test_loss_is_log2_with_zero_rewards_when_policy_equals_reference():
    model = tiny_llama()
    pairs = [([5, 6, 7], [10, 11, 0], [12, 0]), ([5], [13, 14, 15, 0], [16, 17, 0])]
    policy = dpo.pair_logps(model, pairs, 1, "cpu")
    with torch.no_grad():
        reference = dpo.pair_logps(model, pairs, 1, "cpu")
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(*policy, *reference, beta=0.1)
    metrics = dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, *policy)
    assert metrics["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.0
    assert metrics["rewards/margins"].item() == 0.0
    # away from h = 0 the loss is -log sigmoid(beta h): below log 2 when the chosen response gained (h = +2),
    # above when it lost (h = -2); a flipped sign or a missing beta gives other numbers
    chosen, rejected = policy[0].detach(), policy[1].detach()
    for shift, h in ((1.0, 2.0), (-1.0, -2.0)):
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, chosen - shift, rejected + shift, beta=0.1)
        assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.1 * h))] * 2, rel=1e-6)
        metrics = dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        assert metrics["rewards/margins"].item() == pytest.approx(0.1 * h, rel=1e-5)
        assert metrics["rewards/accuracies"].item() == (1.0 if h > 0 else 0.0)


def test_cdpo_matches_the_closed_form():
    pw, pl, rw, rl = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h, beta, eps = (-3.0 + 4.0) - (-5.0 + 4.5), 0.5, 0.2
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    losses, cw, cl = dpo.dpo_loss(pw, pl, rw, rl, beta, eps)
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert cw.item() == pytest.approx(beta * 1.0) and cl.item() == pytest.approx(beta * -0.5)


def test_gradient_matches_the_papers_formula():
    """grad L = -beta E[ sigmoid(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)) ]   (DPO paper, section 4)."""
    beta = 0.5
    model = tiny_llama(seed=3)
    params = list(model.parameters())
    pairs = [([5, 6, 7], [10, 11, 0], [12, 0]), ([5, 9], [13, 14, 15, 0], [16, 17, 0]), ([8], [20, 0], [21, 22, 0])]
    reference_chosen, reference_rejected = torch.tensor([-9.0, -14.0, -7.0]), torch.tensor([-8.0, -13.5, -9.0])
    policy_chosen, policy_rejected = dpo.pair_logps(model, pairs, 1, "cpu")
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    autograd = torch.autograd.grad(losses.mean(), params, allow_unused=True)

    expected = [torch.zeros_like(p) for p in params]
    for i, (prompt, chosen, rejected) in enumerate(pairs):  # one pair at a time, plainly
        lw = sequence_logps(model, collate([(prompt, chosen)], 1))[0][0]
        ll = sequence_logps(model, collate([(prompt, rejected)], 1))[0][0]
        r_w, r_l = beta * (lw.item() - reference_chosen[i].item()), beta * (ll.item() - reference_rejected[i].item())
        weight = 1 / (1 + math.exp(-(r_l - r_w)))
        gw = torch.autograd.grad(lw, params, allow_unused=True)
        gl = torch.autograd.grad(ll, params, allow_unused=True)
        for e, a, b in zip(expected, gw, gl):
            e -= beta * weight * ((0 if a is None else a) - (0 if b is None else b)) / len(pairs)
    for a, e in zip(autograd, expected):
        torch.testing.assert_close(torch.zeros_like(e) if a is None else a, e, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- dpo.py end to end
def read_metrics(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def small_dataset(toy_dir, tmp_path, n=64):
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        lines = f.readlines()[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(lines))
    return str(path)


def test_toy_run_improves_held_out_reward_accuracy_and_gold_reward(toy_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    dpo.main(["--output_dir", out, "--max_steps", "60", "--eval_every", "30", "--save_every", "30"])
    rows = read_metrics(out)
    first, last = rows[0], [r for r in rows if "eval_loss" in r][-1]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["eval_rewards/accuracies"] == 0.0 and first["eval_rewards/margins"] == 0.0
    assert last["step"] == 60 and last["eval_rewards/accuracies"] > 0.6 and last["eval_loss"] < math.log(2) - 0.02
    toy = rows[-1]
    assert toy["toy/gold_reward_after"] > toy["toy/gold_reward_before"] + 0.3
    assert "gold reward" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "model.safetensors")) and os.path.exists(os.path.join(out, "args.json"))


def test_resumed_run_ends_with_the_same_weights(toy_dir, tmp_path, monkeypatch):
    # The loss is scaled by a random factor drawn from torch's global RNG, so the weights depend on the RNG
    # stream: a resume that does not restore the RNG state ends elsewhere. 63 training pairs at 8 a step make
    # 7 steps an epoch: the resumed part (steps 6-10) crosses into the second epoch, whose order differs.
    loss = dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: (lambda l, c, r: (l * (1 + torch.rand(())), c, r))(*loss(*a, **k)))
    data = small_dataset(toy_dir, tmp_path)
    common = ["--model", os.path.join(toy_dir, "sft"), "--dataset", data, "--batch_size", "4", "--grad_accum", "2",
              "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every", "100", "--save_every", "3"]
    dpo.main(common + ["--output_dir", str(tmp_path / "a"), "--max_steps", "10"])
    dpo.main(common + ["--output_dir", str(tmp_path / "b"), "--max_steps", "5"])
    shutil.rmtree(tmp_path / "b" / "checkpoint-5")  # as if killed after step 5: the newest checkpoint is step 3
    dpo.main(common + ["--output_dir", str(tmp_path / "b"), "--max_steps", "10", "--resume"])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    initial = load_file(os.path.join(toy_dir, "sft", "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # training did move the weights
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b")) if "grad_norm" in r]
    assert steps == list(range(1, 11))
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "b")) if "grad_norm" in r][6:8] == [1.0, 1.143]


def test_precomputed_reference_trains_like_a_frozen_reference_model(toy_dir, tmp_path):
    data = small_dataset(toy_dir, tmp_path)
    sft = os.path.join(toy_dir, "sft")
    common = ["--model", sft, "--dataset", data, "--batch_size", "4", "--grad_accum", "2", "--learning_rate", "1e-3",
              "--warmup_steps", "2", "--eval_every", "3", "--max_steps", "6"]
    dpo.main(common + ["--output_dir", str(tmp_path / "pre")])
    dpo.main(common + ["--output_dir", str(tmp_path / "ref"), "--ref_model", sft])
    pre, ref = read_metrics(str(tmp_path / "pre")), read_metrics(str(tmp_path / "ref"))
    for a, b in zip(pre, ref):
        for k in ("loss", "rewards/margins", "eval_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["step"], k)
    assert not os.path.exists(tmp_path / "ref" / "reference_logps.pt")


def test_gradient_checkpointing_trains_like_the_plain_run(toy_dir, tmp_path, monkeypatch):
    calls = {}  # training-mode calls of the first decoder layer's MLP, per run (module hooks do not see the
    # recomputation in backward, so the MLP's forward itself is wrapped)

    def counting_load_model(*a, **k):
        model = load_model(*a, **k)
        run, mlp = len(calls), model.model.layers[0].mlp
        calls[run], forward = 0, mlp.forward
        mlp.forward = lambda *x, **y: calls.__setitem__(run, calls[run] + mlp.training) or forward(*x, **y)
        return model
    import common  # the policy is loaded by common.load_policy
    load_model = common.load_model
    monkeypatch.setattr(common, "load_model", counting_load_model)
    data = small_dataset(toy_dir, tmp_path)
    common = ["--model", os.path.join(toy_dir, "sft"), "--dataset", data, "--batch_size", "4", "--grad_accum", "1",
              "--learning_rate", "1e-3", "--warmup_steps", "1", "--eval_every", "3", "--max_steps", "4"]
    dpo.main(common + ["--output_dir", str(tmp_path / "plain")])
    dpo.main(common + ["--output_dir", str(tmp_path / "ckpt"), "--gradient_checkpointing"])
    assert calls == {0: 4, 1: 8}  # 4 training forwards; with checkpointing each is run again in backward
    plain, ckpt = read_metrics(str(tmp_path / "plain")), read_metrics(str(tmp_path / "ckpt"))
    assert len(plain) == len(ckpt) >= 4
    for a, b in zip(plain, ckpt):
        for k in ("loss", "grad_norm", "rewards/margins", "eval_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy_dir, tmp_path):
    data = small_dataset(toy_dir, tmp_path)
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match="non-finite"):
        dpo.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", data, "--output_dir", str(out),
                  "--batch_size", "4", "--grad_accum", "1", "--warmup_steps", "0", "--learning_rate", "1e30",
                  "--save_every", "1", "--eval_every", "100", "--max_steps", "20"])
    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert len(checkpoints) == 1 and not os.path.exists(out / "model.safetensors")
    weights = load_file(str(out / checkpoints[0] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
