"""D2PO: the discriminator's Bradley-Terry loss, accuracy and scores against plain implementations; which pairs get
gold and which order wins; the gold log (budget, never asking twice, a line cut by a kill); the human labeller on
piped input; a short toy run of every --labels mode; kills while gold is asked; D2PO's own bad input. The shared
checks (kills in training, SIGTERM, refused resumes, bad data) are in test_runs.py."""
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import d2po
from conftest import ROOT, tiny_llama


# ---------------------------------------------------------------- the discriminator
def test_bradley_terry_loss_and_accuracy_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(50, generator=g, dtype=torch.float64) * 3, torch.randn(50, generator=g, dtype=torch.float64) * 3
    rejected[:5] = chosen[:5]  # ties
    plain = [math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert d2po.bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(plain, rel=1e-12)
    a_wins = torch.rand(50, generator=g) < 0.5
    agree = [(0.5 if a == b else float((a > b) == bool(w))) for a, b, w in zip(chosen.tolist(), rejected.tolist(), a_wins.tolist())]
    assert d2po.order_accuracy(chosen, rejected, a_wins) == pytest.approx(sum(agree) / len(agree))


def sequence_classifier(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=1)
    return LlamaForSequenceClassification(config).eval()


def alone(model, row):
    """The score head on a row's last hidden state, the row alone in its batch: no padding, no other row."""
    with torch.no_grad():
        return (model.score.weight @ model.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]).item()


@pytest.mark.parametrize("shared", [True, False], ids=["common-prompt", "no-common-beginning"])
def test_pair_scores_are_the_head_on_each_rows_last_real_token_alone(shared):
    """score_pairs reads each pair's two rows with their common beginning once (or row by row when a pair has
    none); every score must be the model's on that row alone, whatever the batch size."""
    model = sequence_classifier()
    pairs = [([5, 6, 7, 8, 9, 10], [5, 6, 7, 20, 21]), ([11, 12, 2], [11, 12, 30, 31, 32, 33, 34]),
             ([13, 14, 15, 16], [13, 14, 15, 16, 17]), ([40, 41], [40, 42]), ([50, 51, 52], [50, 51, 52])]
    if not shared:
        pairs.append(([60, 61, 62], [63, 61, 62]))  # no common first token: every pair row by row
    assert (d2po.prefix_groups(pairs) is None) != shared
    expected = [[alone(model, a), alone(model, b)] for a, b in pairs]
    for batch_size in (2, 4, 64):
        scores = d2po.score_pairs(model, pairs, 1, "cpu", batch_size)
        assert scores.shape == (len(pairs), 2)
        assert scores.tolist() == [pytest.approx(e, abs=1e-5) for e in expected]


def test_prefix_groups_keep_every_row_whole_and_every_rest_nonempty():
    pairs = [([1, 2, 3], [1, 2, 3]), ([1, 2], [1, 2, 3, 4]), ([7, 8, 9], [7, 5]), ([6, 6, 6, 1], [6, 6, 6, 2, 2])]
    groups = d2po.prefix_groups(pairs)
    for (a, b), (p, (ra, rb)) in zip(pairs, groups):
        assert (p + ra, p + rb) == (a, b) and len(ra) >= 1 and len(rb) >= 1
    assert [p for p, _ in groups] == [[1, 2], [1], [7], [6, 6, 6]]
    assert d2po.prefix_groups([([1, 2], [3, 4])]) is None  # no common first token
    assert d2po.prefix_groups([([4], [4, 4])]) is None  # a one-token row cannot keep a beginning and a rest


def test_training_the_discriminator_lowers_its_loss_on_the_gold_pairs_and_keeps_the_optimizer_state():
    model = sequence_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pairs = [([5, 6, 7 + i], [5, 6, 100 + i]) for i in range(8)]  # y_w ends in a low token id, y_l in a high one

    def loss():
        scores = d2po.score_pairs(model, pairs, 1, "cpu", 16)
        return d2po.bradley_terry_loss(scores[:, 0], scores[:, 1]).mean().item()
    before = loss()
    args = d2po.Args(disc_epochs=3, disc_batch_size=3)
    d2po.train_discriminator(model, optimizer, pairs, args, 1, "cpu", torch.Generator().manual_seed(0))
    assert loss() < before
    steps = optimizer.state[next(model.parameters())]["step"]
    assert steps == 3 * 3  # 3 epochs of ceil(8 / 3) batches, in the one optimizer
    d2po.train_discriminator(model, optimizer, pairs, args, 1, "cpu", torch.Generator().manual_seed(1))
    assert optimizer.state[next(model.parameters())]["step"] == 18  # continued, not reset


# ---------------------------------------------------------------- which pairs get gold, which order wins
@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20), st.integers(0, 25), st.integers(0, 2**31))
def test_conf_picks_the_smallest_margins_among_the_eligible_pairs(margins, n, seed):
    g = torch.Generator().manual_seed(seed)
    eligible = torch.rand(len(margins), generator=g) < 0.8
    picked = d2po.gold_candidates(torch.tensor(margins, dtype=torch.float64), eligible, n, "conf", g)
    naive = sorted((abs(m), i) for i, m in enumerate(margins) if eligible[i])[:n]  # (|margin|, index): ties by index
    assert picked == [i for _, i in naive]
    random_pick = d2po.gold_candidates(torch.tensor(margins), eligible, n, "rand", g)
    assert len(random_pick) == len(naive) and len(set(random_pick)) == len(random_pick)
    assert all(eligible[i] for i in random_pick)


def test_gold_overrides_the_silver_order_gold_ties_keep_it_and_a_silver_tie_has_none():
    margins = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 1.0])  # silver: a, b, a, b, a (tie), a
    gold = {0: "b", 1: "a", 2: "tie", 3: "skip", 5: "a"}
    assert d2po.pair_order(margins, gold) == [1, 0, 0, 1, None, 0]  # a silver tie without a gold winner: no order
    assert d2po.pair_order(margins, {}) == [0, 1, 0, 1, None, 0]
    assert d2po.pair_order(margins, {4: "b"}) == [0, 1, 0, 1, 1, 0]


# ---------------------------------------------------------------- the gold log and the labellers
def test_gold_log_counts_charged_labels_reuses_them_and_drops_a_line_cut_by_a_kill(tmp_path):
    path = str(tmp_path / "gold.jsonl")
    log = d2po.GoldLog(path)
    pairs = [{"key": d2po.GoldLog.key([1], [2 + i], [3 + i]), "prompt": "p", "a": f"a{i}", "b": f"b{i}"} for i in range(6)]
    answers = iter(["a", "skip", "tie", "b", "a", "b"])
    asked = []
    ask = lambda pair: asked.append(pair["key"]) or next(answers)
    labels, n = d2po.collect_gold(ask, log, pairs[:4], budget=10, meta={"step": 1})
    assert labels == ["a", "skip", "tie", "b"] and n == 4 and log.charged == 3  # a skip is free, a tie is charged
    with open(path, "a") as f:
        f.write('{"key": "cut sho')  # a kill while a label was written
    log = d2po.GoldLog(path)  # reopened: the cut line is gone, the four complete ones are there
    assert log.charged == 3 and open(path).read().count("\n") == 4 and open(path).read().endswith("\n")
    labels, n = d2po.collect_gold(ask, log, pairs, budget=4, meta={"step": 2})
    assert labels == ["a", "skip", "tie", "b", "a"] and n == 1  # the first four from disk; one more fits the budget
    assert asked == [p["key"] for p in pairs[:5]] and log.charged == 4  # nothing asked twice, the budget kept
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5



def test_a_judge_that_labels_a_batch_is_given_only_the_pairs_the_budget_allows_and_none_on_disk(tmp_path):
    """A reward-model judge scores a step's pairs in one batch (ask.prepare) before they are asked one by one: it
    must get the pairs not on disk, no more than the budget has room for, and the labels must be its verdicts."""
    log = d2po.GoldLog(str(tmp_path / "gold.jsonl"))
    pairs = [{"key": d2po.GoldLog.key([1], [2 + i], [3 + i]), "prompt": "p", "a": f"a{i}", "b": f"b{i}"} for i in range(6)]
    verdicts, prepared, asked = {p["key"]: "ab"[i % 2] if i != 3 else "tie" for i, p in enumerate(pairs)}, [], []
    ask = lambda pair: asked.append(pair["key"]) or verdicts[pair["key"]]
    ask.prepare = lambda batch: prepared.append([p["key"] for p in batch])
    labels, n = d2po.collect_gold(ask, log, pairs[:2], budget=5, meta={"step": 1})
    assert labels == ["a", "b"] and n == 2 and prepared == [[p["key"] for p in pairs[:2]]]
    labels, n = d2po.collect_gold(ask, log, pairs, budget=5, meta={"step": 2})  # two on disk, room for three more
    assert labels == ["a", "b", "a", "tie", "a"] and n == 3 and log.charged == 5
    assert prepared[1] == [p["key"] for p in pairs[2:5]] and asked == [p["key"] for p in pairs[:5]]
    labels, n = d2po.collect_gold(ask, log, pairs, budget=5, meta={"step": 3})  # the budget is spent
    assert labels == ["a", "b", "a", "tie", "a"] and n == 0 and len(prepared) == 2

def test_human_labeller_reads_piped_answers_asks_again_on_nonsense_and_stops_at_end_of_input():
    out = io.StringIO()
    ask = d2po.human_gold(io.StringIO("1\nmaybe\n2\nT\n s \n"), out)
    pair = {"prompt": "the movie", "a": " was great .", "b": " was dull ."}
    assert [ask(pair) for _ in range(4)] == ["a", "b", "tie", "skip"]
    with pytest.raises(d2po.InputEnded):
        ask(pair)
    shown = out.getvalue()
    assert shown.count("which is better?") == 5 and "please type 1, 2, t or s" in shown
    assert "the movie" in shown and " was great ." in shown and " was dull ." in shown


# ---------------------------------------------------------------- short runs on the toy
@pytest.fixture(scope="module")
def data(toy_dir, tmp_path_factory):
    """80 of the toy's training pairs (their distinct prompts are the training prompts; one pair is held out)."""
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        lines = f.readlines()[:80]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(lines))
    return str(path)


def flags(toy_dir, data, out, *extra):
    return ["--model", os.path.join(toy_dir, "sft"), "--dataset", data, "--gold", "toy", "--output_dir", str(out), "--batch_size", "4",
            "--grad_accum", "1", "--learning_rate", "1e-3", "--warmup_steps", "1", "--max_new_tokens", "16",
            "--max_steps", "6", "--gold_per_window", "3", "--window_pairs", "8", "--gold_budget", "7",
            "--disc_epochs", "1", "--disc_learning_rate", "1e-3", "--eval_every", "100", "--save_every", "2", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def training_rows(out):
    return [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "grad_norm" in r]


def window_schedule(pairs_per_step, R, S, budget, steps, initial=0):
    """Gold labels charged in each step by the authors' windows (every pair eligible, no ties or skips): a window
    takes up to R gold from consecutive steps; S pairs after it opened (its gold steps included) the next one opens,
    once the gold is spent; the budget caps all."""
    used, left, opened, seen, out = initial, R, True, 0, []
    for _ in range(steps):
        if not opened and seen >= S and used < budget:
            opened, left, seen = True, R, 0
        if opened:
            n = min(left, pairs_per_step, budget - used)
            used, left = used + n, left - n
            out.append(n)
            if left == 0 or used >= budget:
                opened = False
        else:
            out.append(0)
        seen += pairs_per_step
    return out


@pytest.mark.parametrize("labels", ["d2po", "gold", "static", "self"])
def test_every_labels_mode_runs_on_the_toy_within_the_gold_budget(labels, toy_dir, data, tmp_path, capsys):
    out = tmp_path / labels
    extra = ["--labels", labels] + (["--initial_gold", "4"] if labels == "static" else [])
    d2po.main(flags(toy_dir, data, out, *extra))
    assert (out / "model.safetensors").exists() and (out / "discriminator").exists() == (labels in ("d2po", "static"))
    gold = read_jsonl(out / "gold.jsonl")
    rows = training_rows(out)
    used = [r["gold/used"] for r in rows]
    assert len(gold) == used[-1] <= 7 and len({g["key"] for g in gold}) == len(gold)
    steps = [b - a for a, b in zip([0] + used, used)]
    if labels in ("d2po", "self"):  # the authors' windows (the toy's 16-token samples are never identical here)
        assert steps == window_schedule(4, 3, 8, 7, 6)
        assert rows[-1]["disc/accuracy"] is not None
    elif labels == "static":
        assert used == [4] * 6 and all(g["step"] == 0 for g in gold)  # the initial gold, then never again
    else:  # gold: every pair labelled until the budget is spent, then the run stops; resumed, it is complete
        assert used[0] == 4 and used[-1] == 7 and len(rows) == 2
        assert all(r["silver/pairs"] == 0 for r in rows)
        final = (out / "model.safetensors").stat().st_mtime_ns
        d2po.main(flags(toy_dir, data, out, *extra, "--resume"))
        assert "gold budget was spent at step 2); nothing to do" in capsys.readouterr().out
        assert (out / "model.safetensors").stat().st_mtime_ns == final and len(training_rows(out)) == 2
    for r in rows:
        assert r["gold/pairs"] + r["silver/pairs"] <= 4 and math.isfinite(r["grad_norm"])


def test_updates_per_step_makes_that_many_optimizer_steps_on_each_step_s_pairs(toy_dir, data, tmp_path):
    out = tmp_path / "run"
    d2po.main(flags(toy_dir, data, out, "--labels", "gold", "--updates_per_step", "3", "--max_steps", "2"))
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 6 and state["step"] == 2
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert all(s["step"] == 6 for s in optimizer["state"].values())  # the policy's; the discriminator's: extra_state.pt


def test_human_gold_with_piped_stdin_stops_cleanly_and_a_resume_asks_only_for_new_labels(toy_dir, data, tmp_path,
                                                                                            monkeypatch, capsys):
    out = tmp_path / "human"
    args = flags(toy_dir, data, out, "--gold", "human")
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n2\nt\ns\n"))  # a pipe: 3 charged labels, a skip, then its end
    d2po.main(args)  # returns: a clean stop
    stderr = capsys.readouterr().err
    assert "stdin ended" in stderr and "--resume" in stderr.strip().splitlines()[-1]
    assert stderr.count("which is better?") == 5  # the window's 3, then in the next window a skip and the unanswered one
    gold = read_jsonl(out / "gold.jsonl")
    assert [g["label"] for g in gold] == ["a", "b", "tie", "skip"]
    assert (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()  # stopped in step 3, all saved
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n" * 20))
    d2po.main(args + ["--resume"])
    gold = read_jsonl(out / "gold.jsonl")
    assert capsys.readouterr().err.count("which is better?") == len(gold) - 4  # only labels it did not have
    assert len({g["key"] for g in gold}) == len(gold) and sum(g["label"] != "skip" for g in gold) == 7  # the budget
    assert (out / "model.safetensors").exists()


def test_a_kill_while_gold_is_asked_never_exceeds_the_budget_nor_asks_twice(toy_dir, data, tmp_path):
    d2po.main(flags(toy_dir, data, tmp_path / "baseline"))  # uninterrupted, in this process
    expected = read_jsonl(tmp_path / "baseline" / "gold.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = lambda argv, crash=None: subprocess.run([sys.executable, os.path.join(ROOT, "d2po.py"), *argv], capture_output=True,
                                                  text=True, cwd=ROOT, env={**env, "DPO_CRASH_AT": crash or ""}, timeout=300)
    out = tmp_path / "killed"
    killed = run(flags(toy_dir, data, out), crash="gold:5")  # the fifth label asked (step 3): known, not yet written
    assert killed.returncode == -signal.SIGKILL
    assert len(read_jsonl(out / "gold.jsonl")) == 4
    resumed = run(flags(toy_dir, data, out, "--resume"))  # from checkpoint-2: step 3's first label is on disk
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = read_jsonl(out / "gold.jsonl")
    assert [(g["key"], g["label"]) for g in got] == [(g["key"], g["label"]) for g in expected]  # the same labels, once
    assert len(got) == 7 and training_rows(out)[-1]["gold/used"] == 7


def test_a_reward_model_as_gold_prefers_the_response_it_scores_higher(toy_dir, data, tmp_path):
    """A sequence classifier saved with save_pretrained is the judge: each label must be the order of its scores."""
    from common import load_tokenizer
    judge = sequence_classifier(seed=3)
    tokenizer = load_tokenizer(os.path.join(toy_dir, "sft"))
    judge.config.pad_token_id = tokenizer.pad_token_id
    judge.resize_token_embeddings(len(tokenizer))
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    out = tmp_path / "run"
    d2po.main(flags(toy_dir, data, out, "--gold", f"rm:{tmp_path / 'judge'}", "--max_steps", "2"))
    gold = read_jsonl(out / "gold.jsonl")
    assert len(gold) == 3
    for g in gold:
        rows = [tokenizer(g["prompt"] + g[k])["input_ids"] for k in ("response_a", "response_b")]
        a, b = alone(judge, rows[0]), alone(judge, rows[1])
        assert g["label"] == ("a" if a > b else "b" if b > a else "tie")


# ---------------------------------------------------------------- D2PO's own bad input
def test_bad_input_of_d2po_stops_with_one_line_and_writes_nothing(toy_dir, tmp_path):
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "i think", "overall the plot"]))
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "the movie was great"}) + "\n")
    sft = os.path.join(toy_dir, "sft")
    cases = {
        "prompt-less dataset": (str(no_prompt), [], ["no_prompt.jsonl: line 2: field 'prompt': missing"]),
        "reward model that is not a classifier": (str(prompts_only), ["--gold", f"rm:{sft}"],
                                                  ["--gold rm:", "not a sequence-classification reward model", "LlamaForCausalLM"]),
        "unknown gold": (str(prompts_only), ["--gold", "oracle"], ["--gold must be toy, human or rm:"]),
        "rm without a model": (str(prompts_only), ["--gold", "rm:"], ["--gold must be toy, human or rm:<hub id or path>"]),
        "static without initial gold": (str(prompts_only), ["--labels", "static"], ["--labels static needs a trained discriminator"]),
        "initial gold over budget": (str(prompts_only), ["--initial_gold", "9", "--gold_budget", "8"], ["--initial_gold 9 is more"]),
        "initial gold without a discriminator": (str(prompts_only), ["--labels", "gold", "--initial_gold", "2"],
                                                 ["--labels gold does not have"]),
        "responses longer than max_length": (str(prompts_only), ["--max_new_tokens", "64", "--max_length", "64"],
                                             ["--max_new_tokens 64 must be less than --max_length 64"]),
        "more prompts a step than there are": (str(prompts_only), ["--batch_size", "4"], ["only 3 distinct training prompts"]),
    }
    for name, (dataset, extra, expected) in cases.items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as stopped:
            d2po.main(["--model", sft, "--dataset", dataset, "--gold", "toy", "--output_dir", str(out), "--batch_size", "1",
                       "--grad_accum", "1", *extra])
        message = stopped.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (name, message)
        for part in expected:
            assert part in message, (name, message)
        assert not out.exists(), name


def test_a_prompt_only_dataset_trains_without_held_out_pairs(toy_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie", "i think", "overall the plot", "honestly"]))
    out = tmp_path / "run"
    d2po.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(prompts), "--gold", "toy", "--output_dir", str(out), "--batch_size", "2",
               "--grad_accum", "1", "--max_steps", "2", "--max_new_tokens", "8", "--gold_budget", "3", "--gold_per_window", "2"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and not any("eval_loss" in r for r in rows)
    assert len(read_jsonl(out / "gold.jsonl")) <= 3


def test_a_model_of_ones_own_needs_a_gold_source(toy_dir, tmp_path):
    """The toy's annotator is the default on the toy task only: on a real model it would score text it cannot read."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        d2po.main(["--model", os.path.join(toy_dir, "sft"), "--output_dir", str(out)])
    assert "--gold must be toy, human or rm:<hub id or path>, and given with --model (got None)" in stopped.value.code
    assert not out.exists()


# ---------------------------------------------------------------- the paper's set-up, and what the DPO step trains on
def test_the_defaults_are_the_papers_window_and_a_pretrained_discriminator_on_the_toy():
    args = d2po.parse_args(["--model", "m", "--dataset", "d", "--gold", "toy"])
    assert args.gold_per_window == 16 and 2 * args.window_pairs == 256  # the authors' R = 16 of SAMPN = 256 texts
    assert args.gold_per_window / args.window_pairs == 1 / 8  # gold is 1/8 of a window's pairs, gold steps included
    d2po.check_flags(args)
    assert args.disc_pretrain == "none" and args.initial_gold == 0  # a real model: --disc_model is the paper's start
    toy_args = d2po.parse_args([])
    d2po.check_flags(toy_args)
    assert toy_args.disc_pretrain == "toy" and toy_args.initial_gold == 0  # the toy: a reward model on its pairs
    assert toy_args.gold_per_window / toy_args.window_pairs == 1 / 8


@pytest.mark.parametrize("argv", [[], ["--labels", "gold"], ["--labels", "self"], ["--labels", "static"],
                                  ["--gold_budget", "12"], ["--gold_budget", "0"], ["--disc_pretrain", "none"]])
def test_no_toy_default_makes_a_documented_command_or_a_lowered_flag_fail(argv):
    args = d2po.parse_args(argv)
    d2po.check_flags(args)  # no SystemExit
    assert args.disc_pretrain == ("toy" if args.labels in ("d2po", "static") and "none" not in argv else "none")


def test_an_error_about_dependent_flags_names_only_flags_the_user_gave():
    for argv, given in [(["--labels", "gold", "--initial_gold", "4"], "--initial_gold"),
                        (["--labels", "self", "--disc_pretrain", "p.jsonl"], "--disc_pretrain"),
                        (["--initial_gold", "40", "--gold_budget", "32"], "--initial_gold 40"),
                        (["--labels", "static", "--disc_pretrain", "none"], "--labels static")]:
        with pytest.raises(SystemExit) as stopped:
            d2po.check_flags(d2po.parse_args(argv))
        message = stopped.value.code
        assert given in message, (argv, message)
        flags_named = {w.strip("(),:;") for w in message.split() if w.startswith("--")}
        allowed = {a for a in argv if a.startswith("--")} | {"--disc_pretrain", "--disc_model", "--initial_gold"}
        assert flags_named <= allowed, (argv, message)


def test_a_silver_tie_gives_no_dpo_term_and_no_gradient():
    margins = torch.tensor([1.5, 0.0, -0.5, 0.0, 2.0])  # pair 1: a silver tie; pair 3: a tie that gold orders
    eligible = torch.tensor([True, True, True, True, False])  # pair 4: identical samples
    keep, winners = d2po.dpo_pairs(margins, {3: "b"}, eligible)
    assert keep == [0, 2, 3] and winners == [0, 1, 1]
    policy = torch.randn(5, 2, requires_grad=True)  # (P, 2) log pi of y_a, y_b
    reference = torch.randn(5, 2)
    index, first = torch.tensor(keep), torch.tensor(winners)
    losses, _, _ = d2po.dpo_loss(policy[index, first], policy[index, 1 - first], reference[index, first],
                                 reference[index, 1 - first], beta=0.1)
    losses.mean().backward()
    assert torch.all(policy.grad[1] == 0) and torch.all(policy.grad[4] == 0)
    assert all(torch.all(policy.grad[i] != 0) for i in keep)
    keep, _ = d2po.dpo_pairs(margins, {0: "a", 1: "tie", 2: "skip"}, eligible, gold_only=True)
    assert keep == [0]  # gold only: a pair trains only with a gold winner


@pytest.mark.parametrize("labels", ["gold", "d2po"])
def test_the_dpo_step_trains_each_gold_labelled_pair_in_gold_jsonls_order(labels, toy_dir, data, tmp_path, monkeypatch):
    """What the policy's loss sees, recorded at pair_logps (prompt, chosen, rejected), against gold.jsonl's winners:
    a run that computed the gold labels and then ordered its pairs by the silver scores alone must fail here."""
    from common import load_tokenizer
    tokenizer = load_tokenizer(os.path.join(toy_dir, "sft"))
    trained, pair_logps = [], d2po.pair_logps

    def recording(model, pairs, *rest):
        if torch.is_grad_enabled():  # the DPO step (evaluation runs under no_grad)
            trained.extend(pairs)
        return pair_logps(model, pairs, *rest)
    monkeypatch.setattr(d2po, "pair_logps", recording)
    out = tmp_path / labels
    d2po.main(flags(toy_dir, data, out, "--labels", labels, "--max_steps", "3"))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    gold = {(g["prompt"], g["response_a"], g["response_b"]): g["label"] for g in read_jsonl(out / "gold.jsonl")}
    checked = 0
    for prompt, chosen, rejected in trained:
        p, c, r = decode(prompt), decode(chosen), decode(rejected)
        label = gold.get((p, c, r)) or gold.get((p, r, c))
        if label in ("a", "b"):
            a, b = (c, r) if (p, c, r) in gold else (r, c)
            assert c == (a if label == "a" else b), (p, c, r, label)
            checked += 1
    winners = sum(g in ("a", "b") for g in gold.values())
    assert checked == winners > 0  # every gold winner was trained on, once, in its gold order
    if labels == "gold":
        assert len(trained) == winners  # and nothing else
