"""DICE: the alpha search, the pairs and the replay against constructed cases and naive versions; two rounds on
the toy checked for the paper's bookkeeping (which model scores against which, which one is the reference);
kills between and inside stages; DICE's own bad input. The shared checks (kills in training, SIGTERM, refused
resumes, bad data) are in test_runs.py."""
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import dice
from conftest import ROOT


# ---------------------------------------------------------------- the alpha search and the pairs
def naive_pairs(scores, lengths, valid, alpha):
    """y_w, y_l per prompt by a plain loop: the first best and the last worst of s - alpha |y|."""
    pairs = []
    for s, n, ok in zip(scores, lengths, valid):
        r = [(si - alpha * ni, k) for k, (si, ni, oki) in enumerate(zip(s, n, ok)) if oki]
        best, worst = max(v for v, _ in r), min(v for v, _ in r)
        pairs.append((min(k for v, k in r if v == best), max(k for v, k in r if v == worst)))
    return pairs


def naive_gap(scores, lengths, valid, alpha):
    pairs = naive_pairs(scores, lengths, valid, alpha)
    return sum(n[w] - n[l] for n, (w, l) in zip(lengths, pairs)) / len(pairs)


def test_alpha_search_finds_the_zero_gap_and_stops_at_the_first_increase():
    # Prompt 1 prefers its 10-character answer to its empty one until alpha = 0.105, prompt 2 until 0.305: the gap
    # is +10 below 0.105, 0 between, -10 above 0.305. On a grid of 0.01 the search must return 0.11 (the first
    # zero) and stop at 0.31, where |gap| first rises.
    scores, lengths = torch.tensor([[1.05, 0.0], [3.05, 0.0]]), torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    alpha, trace = dice.search_alpha(scores, lengths, valid, step=0.01, max_alpha=1.0)
    assert alpha == pytest.approx(0.11)
    assert [a for a, _ in trace] == pytest.approx([k / 100 for k in range(32)])
    assert [g for _, g in trace] == [10.0] * 11 + [0.0] * 20 + [-10.0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31))
def test_alpha_search_agrees_with_an_exhaustive_scan(n_prompts, k, seed):
    """The gap can only fall as alpha grows (a larger alpha never picks a longer y_w or a shorter y_l), so the
    early stop finds the grid's global minimum of |gap|: compared with a scan of the whole grid by naive_gap."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_prompts, k, generator=g, dtype=torch.float64) * 5
    lengths = torch.randint(0, 60, (n_prompts, k), generator=g).double()
    valid = torch.rand(n_prompts, k, generator=g) < 0.8
    valid[:, :2] = True
    alpha, trace = dice.search_alpha(scores, lengths, valid, step=0.02, max_alpha=1.0)
    grid = [(i * 0.02, naive_gap(scores.tolist(), lengths.tolist(), valid.tolist(), i * 0.02)) for i in range(50)]
    best = min(abs(gap) for _, gap in grid)
    assert abs(naive_gap(scores.tolist(), lengths.tolist(), valid.tolist(), alpha)) == pytest.approx(best)
    assert alpha == pytest.approx(next(a for a, gap in grid if abs(gap) == pytest.approx(best)))  # the smallest such
    assert [g for _, g in trace] == pytest.approx([gap for _, gap in grid[:len(trace)]])


def test_best_and_worst_skip_unusable_responses_and_split_ties():
    scores = torch.tensor([[9.0, 1.0, 5.0, -9.0], [2.0, 2.0, 2.0, 0.0], [0.0, 3.0, 3.0, 1.0]])
    lengths = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[False, True, True, False], [True, True, True, False], [True, True, True, True]])
    chosen, rejected = dice.select_pairs(scores, lengths, valid, 0.0)
    # row 0: the best (9) and the worst (-9) are unusable; row 1: all usable ones tie, so y_w = first, y_l = last
    assert chosen.tolist() == [2, 0, 1] and rejected.tolist() == [1, 2, 0]
    chosen, rejected = dice.select_pairs(scores, lengths, valid, 2.0)  # 5 - 6 < 1 - 4? no: -1 > -3, so y_w stays 2
    assert chosen.tolist() == [2, 0, 1] and rejected.tolist() == [1, 2, 0]
    chosen, rejected = dice.select_pairs(scores, lengths, valid, 5.0)  # 1 - 10 = -9 > 5 - 15 = -10: the order flips
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2


# ---------------------------------------------------------------- experience replay
@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(0, 40), st.sampled_from([0, 0.25, 0.5, 0.75]),
       st.integers(0, 10), st.integers(0, 1000))
def test_replay_sizes_follow_the_authors_formula_on_disjoint_prompts(n_prompts, per_prompt, n_generated, gamma, overlap, seed):
    offline = [([i], [100 + i, j], [200 + i, j]) for i in range(n_prompts) for j in range(per_prompt)]  # prompt i
    first = n_prompts - min(overlap, n_prompts)  # the generated prompts start here: `overlap` of them are offline's
    generated = [([first + i], [300 + i], [400 + i]) for i in range(n_generated)]
    gen, off = dice.replay_mix(generated, offline, gamma, random.Random(seed))
    gamma = Fraction(gamma)
    n_gen = min(math.floor(n_prompts * (1 - gamma)), n_generated)  # N counts prompts, not rows
    n_off = math.floor(gamma * n_gen / (1 - gamma))
    available = n_prompts - len({p[0] for p, _, _ in gen if p[0] < n_prompts})
    assert len(gen) == n_gen and len(off) == min(n_off, available)
    prompts = [tuple(p) for p, _, _ in gen + off]
    assert len(set(prompts)) == len(prompts)  # every prompt once: disjoint, and one offline pair per prompt
    assert all(pair in generated for pair in gen) and all(pair in offline for pair in off)
    if gamma == Fraction(1, 2) and n_generated >= n_prompts and overlap == 0:
        assert len(gen) + len(off) == 2 * (n_prompts // 2)  # half and half, at the offline data's size


# ---------------------------------------------------------------- two rounds on the toy
FLAGS = ["--batch_size", "4", "--grad_accum", "1", "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every",
         "4", "--save_every", "3", "--max_steps", "4", "--rounds", "2", "--num_samples", "4", "--min_valid", "2",
         "--max_prompts", "12", "--max_new_tokens", "32", "--sample_batch_size", "16"]


def run(args, crash_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DPO_CRASH_AT", None)
    env.update({"DPO_CRASH_AT": crash_at} if crash_at else {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "dice.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def setup(toy_dir, tmp_path_factory):
    """pi^(-1) = the toy's SFT model; pi^(0) = the same with noise on every weight, so that scoring against the
    wrong model gives other numbers; 40 offline pairs; and an uninterrupted two-round run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = tmp_path_factory.mktemp("dice")
    sft = os.path.join(toy_dir, "sft")
    model = AutoModelForCausalLM.from_pretrained(sft)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp / "pi0")
    AutoTokenizer.from_pretrained(sft).save_pretrained(tmp / "pi0")
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        (tmp / "pairs.jsonl").write_text("".join(f.readlines()[:40]))
    args = lambda out: ["--model", str(tmp / "pi0"), "--ref_model", sft, "--dataset", str(tmp / "pairs.jsonl"),
                        "--output_dir", str(out), *FLAGS]
    baseline = run(args(tmp / "baseline"))
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    return dict(sft=sft, pi0=str(tmp / "pi0"), out=tmp / "baseline", args=args, tmp=tmp, stdout=baseline.stdout)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@functools.cache
def float64_model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@torch.no_grad()
def naive_logps(model_dir, prompts_and_responses):
    """Summed log-probs by the model's own full logits, one sequence at a time, in float64."""
    model, out = float64_model(model_dir), []
    with dice.torch_threads(1):  # a tiny model: one thread is many times faster on busy cores
        for p, r in prompts_and_responses:
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]  # (len(r), V): positions that predict r
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum().item())
    return torch.tensor(out, dtype=torch.float64)


def test_round_t_scores_pi_t_minus_1_against_pi_t_minus_2_and_trains_against_pi_t_minus_1(setup):
    out, models = setup["out"], {-1: setup["sft"], 0: setup["pi0"], 1: str(setup["out"] / "round_1")}
    for t in (1, 2):
        samples, scores = read(out / f"round_{t}" / "samples.jsonl"), read(out / f"round_{t}" / "scores.jsonl")
        usable = [(row["prompt_ids"], r) for row in samples for r, ok in zip(row["response_ids"], row["usable"]) if ok]
        logged = {k: torch.tensor([v for row in scores for v in row[k] if v is not None], dtype=torch.float64)
                  for k in ("logps_policy", "logps_reference", "scores")}
        policy, reference, sft = (naive_logps(models[t - 1], usable), naive_logps(models[t - 2], usable),
                                  naive_logps(models[-1], usable))
        torch.testing.assert_close(logged["logps_policy"], policy, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(logged["logps_reference"], reference, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(logged["scores"], policy - reference, rtol=1e-4, atol=1e-3)
        assert (reference - policy).abs().max() > 0.1  # scoring against pi^(t-1) itself would give other numbers
        if t == 2:  # and so would scoring round 2 against the SFT model
            assert (reference - sft).abs().max() > 0.1
        # the training reference: pi^(t-1), whose log-probs of the round's pairs are cached before training
        pairs = read(out / f"round_{t}" / "train_pairs.jsonl")
        cached = torch.load(out / f"round_{t}" / "reference_logps.pt")["train"].double()  # (N, 2)
        expected = torch.stack([naive_logps(models[t - 1], [(p["prompt_ids"], p[k]) for p in pairs])
                                for k in ("chosen_ids", "rejected_ids")], -1)
        torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-3)
        first = read(out / f"round_{t}" / "metrics.jsonl")[0]
        assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_cut_off_responses_and_thin_prompts_are_dropped_and_pairs_are_best_and_worst(setup):
    from transformers import AutoTokenizer
    out, max_length, min_valid, seen_cut = setup["out"], 512, 2, False
    eos = AutoTokenizer.from_pretrained(setup["sft"]).eos_token_id
    for t in (1, 2):
        samples, scores = read(out / f"round_{t}" / "samples.jsonl"), read(out / f"round_{t}" / "scores.jsonl")
        pairs, alpha = read(out / f"round_{t}" / "pairs.jsonl"), json.load(open(out / f"round_{t}" / "alpha.json"))["alpha"]
        kept = []
        for row, score in zip(samples, scores):
            ok = [r[-1] == eos and len(row["prompt_ids"]) + len(r) <= max_length for r in row["response_ids"]]
            assert row["usable"] == ok and [s is not None for s in score["scores"]] == ok
            seen_cut |= not all(ok)
            if sum(ok) >= min_valid:
                kept.append((row, score))
        assert [p["prompt_ids"] for p in pairs] == [row["prompt_ids"] for row, _ in kept]  # thin prompts dropped
        expected = naive_pairs([[s or 0.0 for s in score["scores"]] for _, score in kept],
                               [[len(text) for text in row["responses"]] for row, _ in kept],
                               [row["usable"] for row, _ in kept], alpha)
        for pair, (row, _), (w, l) in zip(pairs, kept, expected):
            assert (pair["chosen_ids"], pair["rejected_ids"]) == (row["response_ids"][w], row["response_ids"][l])
        train = read(out / f"round_{t}" / "train_pairs.jsonl")
        generated = [p for p in train if p["source"] == "generated"]
        # 12 prompts sampled (--max_prompts, below half the distinct ones): at gamma = 0.5 every generated pair is
        # used, beside as many offline pairs, on prompts of their own
        assert len(samples) == 12 and len(generated) == len(pairs) and len(train) == 2 * len(pairs)
        prompts = [tuple(p["prompt_ids"]) for p in train]
        assert len(set(prompts)) == len(prompts)
    assert seen_cut  # --max_new_tokens 32 cuts some of the toy's answers


def test_a_round_where_most_samples_are_cut_off_counts_them_and_warns():
    eos, max_length = 0, 10
    prompt = [5, 6, 7]  # 3 tokens: a response of at most 7 fits
    responses = ([[9] * 4] * 5 + [[9, 9]]  # 6 cut off: no EOS within --max_new_tokens
                 + [[9] * 7 + [eos]]  # 1 ended, but 3 + 8 > --max_length
                 + [[9, eos], [eos], [9] * 6 + [eos]])  # 3 usable (the last exactly fills --max_length)
    samples = [{"prompt_ids": prompt, "response_ids": responses[:5]},
               {"prompt_ids": prompt, "response_ids": responses[5:]}]
    metrics, lines = dice.length_drops(1, samples, eos, 4, max_length)
    not_usable = sum(not dice.usable(prompt, r, eos, max_length) for r in responses)  # what a round drops
    assert metrics["samples/dropped_for_length"] == 7 == not_usable and metrics["samples/total"] == 10
    assert metrics["samples/cut_at_max_new_tokens"] == 6 and metrics["samples/over_max_length"] == 1
    assert metrics["samples/dropped_for_length_fraction"] == pytest.approx(0.7)
    assert len(lines) == 2 and lines[0].startswith("round 1: 7 of 10 samples (70.0%) dropped for length")
    assert lines[1].startswith("warning: round 1: 70%") and "raise --max_new_tokens and --max_length" in lines[1]
    # one in ten dropped is not more than a tenth: counted, no warning; a tenth and a bit, only the flag that cut
    mostly_usable = [{"prompt_ids": prompt, "response_ids": [[9, eos]] * 9 + [[9] * 4]}]
    metrics, lines = dice.length_drops(2, mostly_usable, eos, 4, max_length)
    assert metrics["samples/dropped_for_length"] == 1 and len(lines) == 1 and "warning" not in lines[0]
    one_more_cut = mostly_usable + [{"prompt_ids": prompt, "response_ids": [[9] * 4]}]  # 2 of 11
    metrics, lines = dice.length_drops(2, one_more_cut, eos, 4, max_length)
    assert len(lines) == 2 and lines[1].endswith("raise --max_new_tokens (the authors: 2048 new tokens, 4096 in all)")


def test_each_round_logs_and_prints_the_samples_dropped_for_length(setup):
    out = setup["out"]
    for t in (1, 2):
        samples = read(out / f"round_{t}" / "samples.jsonl")
        flags = [ok for row in samples for ok in row["usable"]]  # the responses the round dropped or kept
        dropped = flags.count(False)
        first = read(out / f"round_{t}" / "metrics.jsonl")[0]
        summary = json.load(open(out / f"round_{t}" / "summary.json"))
        for logged in (first, summary):
            assert logged["samples/total"] == len(flags) == 12 * 4
            assert logged["samples/dropped_for_length"] == dropped
            assert logged["samples/dropped_for_length_fraction"] == pytest.approx(dropped / len(flags))
        assert f"round {t}: {dropped} of {len(flags)} samples" in setup["stdout"]
        assert (f"warning: round {t}:" in setup["stdout"]) == (dropped > len(flags) / 10)


def test_kills_inside_and_between_stages_resume_without_redoing_finished_stages(setup):
    expected = load_file(str(setup["out"] / "model.safetensors"))
    usable = sum(sum(row["usable"]) for row in read(setup["out"] / "round_1" / "samples.jsonl"))
    scoring_batches = 2 * math.ceil(usable / 16)  # round 1 scores its samples under two models, 16 at a time
    # killed (SIGKILL) inside round 2's scoring, and between round 1 and round 2
    for point, guard in ((f"score:{scoring_batches + 1}", "sample:1"), ("round:1", None)):
        out = setup["tmp"] / point.replace(":", "-")
        killed = run(setup["args"](out), crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        done = {p: os.stat(p).st_mtime_ns for d in ("round_1", "round_2") if (out / d).exists()
                for p in (out / d).rglob("*") if p.is_file() and p.name in ("samples.jsonl", "scores.jsonl", "pairs.jsonl", "summary.json", "model.safetensors")}
        assert out / "round_1" / "summary.json" in done
        # killed in scoring, the resumed run dies if it samples at all: round 1 is done, round 2's samples written
        resumed = run(setup["args"](out) + ["--resume"], crash_at=guard)
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert done == {p: os.stat(p).st_mtime_ns for p in done}, point  # nothing finished was written again
        got = load_file(str(out / "model.safetensors"))
        assert all((got[k] == expected[k]).all() for k in expected), point  # bitwise on the CPU


# ---------------------------------------------------------------- DICE's own bad input
def test_dice_flags_out_of_range_stop_with_one_line_before_anything_is_written(setup):
    sft, data = setup["sft"], str(setup["tmp"] / "pairs.jsonl")
    cases = {("--replay_ratio", "1"): "--replay_ratio must be in [0, 1)",
             ("--num_samples", "1"): "--num_samples must be at least 2",
             ("--min_valid", "9", "--num_samples", "4"): "--min_valid 9 is more than --num_samples 4",
             ("--temperature", "0"): "--temperature must be a positive number",
             ("--alpha", "-0.1"): "--alpha must be 0 or more",
             ("--rounds", "0"): "--rounds must be at least 1",
             ("--ref_model", None): "--model needs --ref_model",
             ("--ref_model", str(setup["tmp"] / "nowhere")): "nowhere: no such directory"}
    for extra, expected in cases.items():
        out = setup["tmp"] / "never"
        given = {"--model": sft, "--ref_model": sft, "--dataset": data, "--output_dir": str(out),
                 **dict(zip(extra[::2], extra[1::2]))}
        with pytest.raises(SystemExit) as stopped:
            dice.main([a for k, v in given.items() if v is not None for a in (k, v)])
        message = stopped.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (extra, message)
        assert expected in message, (extra, message)
        assert not out.exists(), extra
