"""Point-wise DPO and ULMA: the losses and gradients against the paper's closed forms and decoupled gradient
formulas (written out plainly here), every data format, every bad label, and a short run on the toy task."""
import json
import math
import os

import pytest
import torch

import pointwise_dpo as pw
from common import collate, sequence_logps
from conftest import tiny_llama

sig = lambda v: 1 / (1 + math.exp(-v))
EXAMPLES = [([5, 6, 7], [10, 11, 0], 1.0, True), ([5, 9], [13, 14, 15, 0], 0.0, False),
            ([8], [20, 0], 0.0, False), ([4, 4], [21, 22, 23, 24, 0], 1.0, True), ([7], [30, 31, 0], 0.0, False)]


def row_logp(model, example, average=True):
    """log pi(y|x) of one row, computed alone, per-token mean or sum."""
    logps, n = sequence_logps(model, collate([example[:2]], 1))
    return logps[0] / n[0] if average else logps[0]


@pytest.mark.parametrize("average", [True, False])
def test_rows_sharing_a_prompt_get_the_log_probs_of_each_row_alone(average):
    """Rows with the same prompt (here interleaved with others) share one copy of it in the batch; each row's
    log-prob must still be its own, in the rows' order."""
    model = tiny_llama(seed=4).eval()
    examples = [EXAMPLES[0], ([5, 6, 7], [12, 0], 0.0, False), EXAMPLES[1], ([5, 6, 7], [14, 15, 16, 17, 0], 1.0, True),
                EXAMPLES[2], ([5, 9], [13, 14, 0], 1.0, True)]
    with torch.no_grad():
        got = pw.example_logps(model, examples, 1, "cpu", average)
        alone = torch.stack([row_logp(model, e, average) for e in examples])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type,ulma,average", [("binary", False, True), ("binary", True, True),
                                                    ("continuous", False, False), ("continuous", True, True)])
def test_gradient_matches_the_decoupled_formulas(loss_type, ulma, average):
    """Positives are pushed up with weight beta (1 - sigmoid(beta u + c)) (ULMA: 1, SFT), negatives down with
    beta sigmoid(beta u + c), a scored row with 2 beta (z - beta u - c); each subset's weights over its size."""
    beta, c = 0.5, 0.3
    model = tiny_llama(seed=3)
    params = [p for p in model.parameters()]
    examples = [(p, r, (0.7 if i == 1 else -1.2) if loss_type == "continuous" and not pos else z, pos)
                for i, (p, r, z, pos) in enumerate(EXAMPLES)]
    reference = torch.tensor([-3.0, -2.5, -4.0, -3.5, -2.0])
    policy = pw.example_logps(model, examples, 1, "cpu", average)
    z, positive = pw.targets(examples, "cpu")
    loss, _, _ = pw.pointwise_loss(policy, reference, z, positive, beta, c, loss_type, ulma)
    autograd = torch.autograd.grad(loss, params, allow_unused=True)

    n_pos, n_neg = sum(e[3] for e in examples), sum(not e[3] for e in examples)
    expected = [torch.zeros_like(p) for p in params]
    for i, example in enumerate(examples):  # one row at a time: d loss / d log pi(y_i|x_i) from the paper's formulas
        lp = row_logp(model, example, average)
        s = sig(beta * (lp.item() - reference[i].item()) + c)
        if example[3]:
            weight = (-1.0 if ulma else -beta * (1 - s)) / n_pos
        elif loss_type == "binary":
            weight = beta * s / n_neg
        else:
            weight = -2 * beta * (example[2] - beta * (lp.item() - reference[i].item()) - c) / n_neg
        for e, g in zip(expected, torch.autograd.grad(lp, params, allow_unused=True)):
            e += weight * (0 if g is None else g)
    for a, e in zip(autograd, expected):
        torch.testing.assert_close(torch.zeros_like(e) if a is None else a, e, atol=1e-6, rtol=1e-4)


def test_binary_loss_on_a_pair_with_c_0_is_the_pairwise_closed_form():
    """(chosen, 1), (rejected, 0), c = 0: -log sigmoid(beta u_w) - log sigmoid(-beta u_l) (TRL's bco_pair)."""
    beta, u_w, u_l = 0.3, 1.7, -0.4
    policy, reference = torch.tensor([-2.0 + u_w, -5.0 + u_l]), torch.tensor([-2.0, -5.0])
    loss, losses, rewards = pw.pointwise_loss(policy, reference, torch.tensor([1.0, 0.0]), torch.tensor([True, False]), beta)
    assert loss.item() == pytest.approx(-math.log(sig(beta * u_w)) - math.log(sig(-beta * u_l)), rel=1e-6)
    assert rewards.tolist() == pytest.approx([beta * u_w, beta * u_l], rel=1e-6)
    # with c, both terms move by c: -log sigmoid(beta u_w + c) - log sigmoid(-beta u_l - c)
    loss, _, _ = pw.pointwise_loss(policy, reference, torch.tensor([1.0, 0.0]), torch.tensor([True, False]), beta, c=-0.8)
    assert loss.item() == pytest.approx(-math.log(sig(beta * u_w - 0.8)) - math.log(sig(-beta * u_l + 0.8)), rel=1e-6)


def test_continuous_loss_matches_its_closed_form():
    beta, c = 0.2, 0.1
    u, z = [0.5, -1.0, 3.0, 0.0], [1.3, -0.4, 0.2, 0.0]
    reference = torch.tensor([-4.0, -3.0, -2.0, -1.0])
    policy = reference + torch.tensor(u)
    loss, losses, _ = pw.pointwise_loss(policy, reference, torch.tensor(z), torch.zeros(4, dtype=torch.bool), beta, c,
                                        "continuous")
    squares = [(zi - beta * ui - c) ** 2 for zi, ui in zip(z, u)]
    assert losses.tolist() == pytest.approx(squares, rel=1e-5)
    assert loss.item() == pytest.approx(sum(squares) / 4, rel=1e-5)  # E[(z - beta u - c)^2]
    # a demonstration among them: its own mean, -log sigmoid(beta u + c), added to the squared term's mean
    positive = torch.tensor([True, False, False, False])
    loss, _, _ = pw.pointwise_loss(policy, reference, torch.tensor(z), positive, beta, c, "continuous")
    assert loss.item() == pytest.approx(-math.log(sig(beta * u[0] + c)) + sum(squares[1:]) / 3, rel=1e-5)


def test_ulma_positive_term_does_not_depend_on_the_reference():
    policy = torch.tensor([-1.5, -2.0, -0.7, -3.0], requires_grad=True)
    z, positive = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([True, False, True, False])
    reference = torch.tensor([-1.0, -2.5, -1.0, -2.0], requires_grad=True)
    loss, _, _ = pw.pointwise_loss(policy, reference, z, positive, 0.1, 0.0, "binary", ulma=True)
    grad_policy, grad_reference = torch.autograd.grad(loss, [policy, reference])
    assert grad_reference[positive].abs().max() == 0 and grad_reference[~positive].abs().min() > 0
    assert grad_policy[positive].tolist() == pytest.approx([-0.5, -0.5])  # d/dlogp of -mean_pos(logp): SFT
    moved = reference.detach() + torch.tensor([5.0, 0.0, -7.0, 0.0])  # the positives' reference only
    assert pw.pointwise_loss(policy, moved, z, positive, 0.1, 0.0, "binary", ulma=True)[0].item() == loss.item()
    expected = (1.5 + 0.7) / 2 + (-math.log(sig(-0.1 * 0.5)) - math.log(sig(-0.1 * -1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # without --ulma the positives do depend on it
    assert pw.pointwise_loss(policy, moved, z, positive, 0.1)[0].item() != pw.pointwise_loss(policy, reference, z, positive, 0.1)[0].item()


def test_an_empty_subset_adds_zero_and_no_nan():
    policy, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    for pos in ([True, True], [False, False]):
        loss, losses, _ = pw.pointwise_loss(policy, reference, torch.tensor(pos).float(), torch.tensor(pos), 0.5)
        assert math.isfinite(loss.item()) and loss.item() == pytest.approx(losses.mean().item())


def test_classifier_accuracy_counts_a_tie_as_half():
    rewards, z = torch.tensor([0.0, 0.3, -0.2, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    positive = z.bool()
    metrics = pw.pointwise_metrics(torch.zeros(4), rewards, torch.zeros(4), z, positive, 0.0)
    s, n = metrics["rewards/accuracies"]
    assert (s / n).item() == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    metrics = pw.pointwise_metrics(torch.zeros(4), rewards, torch.zeros(4), z, positive, -0.15)  # sign(r + c)
    assert (metrics["rewards/accuracies"][0] / 4).item() == pytest.approx((0 + 1 + 1 + 1) / 4)


# ---------------------------------------------------------------- data
def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def args_for(*flags):
    return pw.parse_args(["--model", "m", *flags])


def test_every_data_format_loads(tokenizer, tmp_path):
    chat = lambda role, text: [{"role": role, "content": text}]
    unpaired = [{"prompt": "the movie", "completion": " was great .", "label": True},
                {"prompt": "the plot", "completion": " was dull .", "label": False}]
    sets = {
        "unpaired.jsonl": (unpaired, [], [(1.0, True), (0.0, False)]),
        "scores.jsonl": ([{"prompt": "a", "completion": " b", "score": 2.5}, {"prompt": "a", "completion": " c", "score": -1}],
                         ["--loss_type", "continuous", "--label_column", "score"], [(2.5, False), (-1.0, False)]),
        "pairs.jsonl": ([{"prompt": "the movie", "chosen": " was great .", "rejected": " was dull ."}], [],
                        [(1.0, True), (0.0, False)]),
        "implicit.jsonl": ([{"chosen": chat("user", "hi") + chat("assistant", "great"),
                             "rejected": chat("user", "hi") + chat("assistant", "dull")}], [], [(1.0, True), (0.0, False)]),
        "demos.jsonl": ([{"prompt": "the movie", "completion": " was great ."}], [], [(1.0, True)]),
        "chat.jsonl": ([{"prompt": chat("user", "the movie"), "completion": chat("assistant", "was great"), "label": False}],
                       [], [(0.0, False)]),
    }
    for name, (rows, flags, expected) in sets.items():
        examples = pw.load_examples(write(tmp_path / name, rows), tokenizer, args_for(*flags))
        assert [(z, p) for _, _, z, p in examples] == expected, name
        assert all(r[-1] == tokenizer.eos_token_id for _, r, _, _ in examples), name
    import datasets
    datasets.Dataset.from_list(unpaired).to_parquet(str(tmp_path / "u.parquet"))
    datasets.Dataset.from_list(unpaired).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "u.parquet", tmp_path / "saved"):
        assert [(z, p) for _, _, z, p in pw.load_examples(str(source), tokenizer, args_for())] == [(1.0, True), (0.0, False)]
    # labelled rows as demonstrations (--sft_dataset): every row positive, whatever its label
    demos = pw.load_examples(str(tmp_path / "unpaired.jsonl"), tokenizer, args_for(), demonstrations=True)
    assert [(z, p) for _, _, z, p in demos] == [(1.0, True), (1.0, True)]


def test_scores_are_standardised_with_the_training_scores(toy_dir, tmp_path, tokenizer, monkeypatch):
    rows = [{"prompt": "the movie", "completion": f" was {w} .", "score": s}
            for w, s in (("great", 3.0), ("dull", -1.0), ("fine", 1.0), ("ok", 0.0), ("bad", -2.0), ("good", 2.0))]
    data = write(tmp_path / "s.jsonl", rows)
    args = args_for("--dataset", data, "--loss_type", "continuous", "--label_column", "score", "--eval_dataset", data)
    train, held_out = pw.load_data(args, tokenizer)
    scores = torch.tensor([r["score"] for r in rows])
    expected = ((scores - scores.mean()) / scores.std()).tolist()
    assert [z for _, _, z, _ in train] == pytest.approx(expected) and [z for _, _, z, _ in held_out] == pytest.approx(expected)
    train, _ = pw.load_data(pw.parse_args(["--model", "m", "--dataset", data, "--loss_type", "continuous", "--label_column",
                                           "score", "--eval_dataset", data, "--raw_scores"]), tokenizer)
    assert [z for _, _, z, _ in train] == scores.tolist()


def bad_labels(tmp):
    """(rows or raw text, flags, what the message must say) for each bad label."""
    good = [{"prompt": "the movie", "completion": " was great .", "label": True},
            {"prompt": "the plot", "completion": " was dull .", "label": False}] * 3
    scored = [{"prompt": "the movie", "completion": " was great .", "score": 1.5}] * 5
    cont = ["--loss_type", "continuous", "--label_column", "score"]
    raw = lambda rows, line: "\n".join([json.dumps(r) for r in rows] + [line]) + "\n"
    return {
        "NaN score": (raw(scored, '{"prompt": "a", "completion": " b", "score": NaN}'), cont,
                      ["line 6: field 'score'", "finite", "nan"]),
        "infinite score": (raw(scored, '{"prompt": "a", "completion": " b", "score": -Infinity}'), cont,
                           ["line 6: field 'score'", "finite"]),
        "string score": (scored[:3] + [{"prompt": "a", "completion": " b", "score": "high"}], cont,
                         ["line 4: field 'score'", "expected a number", "'high'"]),
        "missing score": (scored[:2] + [{"prompt": "a", "completion": " b"}], cont, ["line 3: field 'score': missing"]),
        "bool column as scores": (good, ["--loss_type", "continuous"], ["line 1: field 'label'", "true/false", "--loss_type binary"]),
        "scores as binary labels": (scored, ["--label_column", "score"], ["line 1: field 'score'", "expected true or false",
                                                                          "--loss_type continuous"]),
        "string label": (good[:4] + [{"prompt": "a", "completion": " b", "label": "yes"}], [],
                         ["line 5: field 'label'", "expected true or false", "'yes'"]),
        "missing label": (good[:2] + [{"prompt": "a", "completion": " b", "label": None}], [], ["line 3: field 'label': missing"]),
        "NaN label": (raw(good, '{"prompt": "a", "completion": " b", "label": NaN}'), [], ["line 7: field 'label'", "true or false"]),
        "no negatives": ([r for r in good if r["label"]] * 2, ["--eval_fraction", "0.2"], ["no negatives (label false)"]),
        "no positives": ([r for r in good if not r["label"]] * 2, ["--eval_fraction", "0.2"], ["no positives"]),
        "demonstrations only": ([{"prompt": "a", "completion": " b"}] * 6, [], ["no negatives", "read as demonstrations"]),
        "pairs for continuous": ([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4, cont,
                                 ["preference pairs", "needs a score column"]),
        "equal scores": (scored, cont, ["scores that differ"]),
        "c infinite": (good, ["--c", "inf"], ["--c must be a finite number"]),
    }


def test_every_bad_label_stops_with_file_line_and_field_before_anything_is_written(toy_dir, tmp_path):
    for name, (rows, flags, expected) in bad_labels(tmp_path).items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(rows) if isinstance(rows, str) else write(path, rows)
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as stopped:
            pw.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(path), "--output_dir", str(out),
                     "--batch_size", "1", "--grad_accum", "1", *flags])
        message = stopped.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (name, message)
        for part in expected + ([] if name.startswith("c ") else [path.name]):
            assert part in message, (name, message)
        assert not out.exists(), name


# ---------------------------------------------------------------- on the toy task
def read_metrics(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_short_toy_run_improves_held_out_classifier_accuracy(toy_dir, tmp_path):
    with open(os.path.join(toy_dir, "unpaired.jsonl")) as f:
        lines = f.readlines()[:480]
    (tmp_path / "u.jsonl").write_text("".join(lines))
    out = str(tmp_path / "run")
    pw.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(tmp_path / "u.jsonl"), "--output_dir", out,
             "--eval_fraction", "0.25", "--batch_size", "32", "--grad_accum", "1", "--learning_rate", "2e-4",
             "--warmup_steps", "5", "--max_length", "128", "--max_steps", "20", "--eval_every", "20"])
    rows = read_metrics(out)
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and first["eval_rewards/accuracies"] == 0.5  # u = 0: every row a tie
    assert first["eval_loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # log 2 per subset
    assert last["step"] == 20 and last["eval_rewards/accuracies"] > 0.6 and last["eval_loss"] < first["eval_loss"]
    assert last["eval_rewards/positive"] > last["eval_rewards/negative"]
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy_dir, tmp_path):
    from safetensors.torch import load_file
    with open(os.path.join(toy_dir, "unpaired.jsonl")) as f:
        (tmp_path / "u.jsonl").write_text("".join(f.readlines()[:64]))
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match="non-finite"):
        pw.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(tmp_path / "u.jsonl"), "--output_dir", str(out),
                 "--batch_size", "8", "--grad_accum", "1", "--warmup_steps", "0", "--learning_rate", "1e30",
                 "--save_every", "1", "--eval_every", "100", "--max_steps", "7"])
    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert len(checkpoints) == 1 and not os.path.exists(out / "model.safetensors")
    weights = load_file(str(out / checkpoints[0] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_precomputed_reference_trains_like_a_frozen_reference_model(toy_dir, tmp_path):
    """The default (the initial policy's log-probs computed once) and --ref_model (a frozen copy) give the same
    losses and rewards step by step, and only the default writes the cache."""
    with open(os.path.join(toy_dir, "unpaired.jsonl")) as f:
        (tmp_path / "u.jsonl").write_text("".join(f.readlines()[:96]))
    sft = os.path.join(toy_dir, "sft")
    common = ["--model", sft, "--dataset", str(tmp_path / "u.jsonl"), "--eval_fraction", "0.25", "--batch_size", "8",
              "--grad_accum", "2", "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every", "3",
              "--max_steps", "6"]
    pw.main(common + ["--output_dir", str(tmp_path / "pre")])
    pw.main(common + ["--output_dir", str(tmp_path / "ref"), "--ref_model", sft])
    pre, ref = read_metrics(str(tmp_path / "pre")), read_metrics(str(tmp_path / "ref"))
    assert [r["step"] for r in pre] == [r["step"] for r in ref] == list(range(7))  # step 0: evaluation only
    for a, b in zip(pre, ref):
        for k in ("loss", "rewards/positive", "rewards/negative", "eval_loss", "eval_rewards/accuracies"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["step"], k)
    assert pre[-1]["loss"] != pytest.approx(pre[1]["loss"], abs=1e-3)  # training moved it
    assert os.path.exists(tmp_path / "pre" / "reference_logps.pt") and not os.path.exists(tmp_path / "ref" / "reference_logps.pt")
