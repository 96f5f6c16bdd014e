"""Several processes under torchrun, on CPU with the gloo backend: the same training as one process.

Two processes with --batch_size 2 see, in each step, the same 8 pairs as one process with --batch_size 4 (the
global batch is batch_size x grad_accum x processes), so the per-step losses and the final weights must agree,
up to the order of floating-point sums (the gradients are averaged over the ranks)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dpo  # noqa: E402


def read_metrics(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(script, args, processes=2):
    """`torchrun --nproc_per_node=2 script args` in a fresh process, one thread a rank; its output on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def data(toy_dir, tmp_path_factory):
    """64 training pairs (8 steps of 8) and 15 held-out pairs (an odd number: one rank's share is padded)."""
    folder = tmp_path_factory.mktemp("data")
    for name, source, n in (("train", "train_pairs.jsonl", 64), ("eval", "test_pairs.jsonl", 15)):
        with open(os.path.join(toy_dir, source)) as f:
            (folder / f"{name}.jsonl").write_text("".join(f.readlines()[:n]))
    return str(folder)


def flags(toy_dir, data, batch_size):
    return ["--model", os.path.join(toy_dir, "sft"), "--dataset", os.path.join(data, "train.jsonl"),
            "--eval_dataset", os.path.join(data, "eval.jsonl"), "--batch_size", str(batch_size), "--grad_accum", "2",
            "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every", "3", "--save_every", "3"]


@pytest.fixture(scope="module")
def one_process(toy_dir, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "run")
    dpo.main(flags(toy_dir, data, 4) + ["--output_dir", out, "--max_steps", "5"])
    return out


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_two_processes_train_and_resume_like_one(toy_dir, data, one_process, tmp_path, mode):
    out = str(tmp_path / "run")
    torchrun("dpo.py", flags(toy_dir, data, 2) + [mode, "--output_dir", out, "--max_steps", "3"])
    assert os.path.isdir(os.path.join(out, "checkpoint-3"))
    result = torchrun("dpo.py", flags(toy_dir, data, 2) + [mode, "--output_dir", out, "--max_steps", "5", "--resume"])
    assert "resuming from" in result.stdout and f"2 processes, {mode[2:].upper()}" not in result.stderr

    one, two = read_metrics(one_process), read_metrics(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 4, 5]  # rank 0 alone wrote them
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "grad_norm", "eval_loss", "eval_rewards/margins"):
            if k in a:  # (each process packs its own pairs into rows: sums rounded in another order)
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
    assert one[-1]["loss"] != one[1]["loss"]  # the weights did move

    # the checkpoint and the final model are whole save_pretrained directories, read by one process
    a, b = load_file(os.path.join(one_process, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    initial = load_file(os.path.join(toy_dir, "sft", "model.safetensors"))
    assert a.keys() == b.keys() == initial.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert max((a[k] - initial[k]).abs().max() for k in a) > 1e-3
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-5"))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_resume_needs_the_same_number_of_processes(toy_dir, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    torchrun("dpo.py", flags(toy_dir, data, 2) + ["--output_dir", out, "--max_steps", "1"])
    with pytest.raises(SystemExit) as e:
        dpo.main(flags(toy_dir, data, 2) + ["--output_dir", out, "--max_steps", "2", "--resume"])
    assert "the number of processes differs" in str(e.value) and "(2 there, 1 here)" in str(e.value)


def test_dice_under_fsdp_samples_and_scores_every_prompt_once_and_saves_a_whole_model(toy_dir, data, tmp_path):
    out, sft = str(tmp_path / "run"), os.path.join(toy_dir, "sft")
    torchrun("dice.py", ["--model", sft, "--ref_model", sft, "--dataset", os.path.join(data, "train.jsonl"),
                         "--eval_dataset", os.path.join(data, "eval.jsonl"), "--batch_size", "2", "--grad_accum", "1",
                         "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every", "4", "--max_steps", "4",
                         "--rounds", "1", "--num_samples", "4", "--min_valid", "2", "--max_prompts", "11",
                         "--max_new_tokens", "32", "--sample_batch_size", "16", "--fsdp", "--output_dir", out])
    rows = lambda name: [json.loads(line) for line in open(os.path.join(out, "round_1", name))]
    samples, scores = rows("samples.jsonl"), rows("scores.jsonl")
    assert len(samples) == len({s["prompt"] for s in samples}) == len(scores) == 11  # an odd count: shares padded
    assert [s["prompt"] for s in samples] == [s["prompt"] for s in scores]
    for sample, score in zip(samples, scores):  # a score exactly where a response is usable
        assert [v is not None for v in score["scores"]] == sample["usable"]
    assert len(read_metrics(os.path.join(out, "round_1"))) == 5
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------- pointwise_dpo.py
@pytest.fixture(scope="module")
def pointwise_one_process(toy_dir, data, tmp_path_factory):
    import pointwise_dpo
    out = str(tmp_path_factory.mktemp("pointwise_one") / "run")
    pointwise_dpo.main(flags(toy_dir, data, 4) + ["--output_dir", out, "--max_steps", "4"])
    return out


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_pointwise_two_processes_train_like_one(toy_dir, data, pointwise_one_process, tmp_path, mode):
    """The pairs read as 128 rows (chosen 1, rejected 0): a micro-batch's positives and negatives are split unevenly
    between the ranks, and the two subsets' means must still be over the whole micro-batch."""
    out = str(tmp_path / "run")
    torchrun("pointwise_dpo.py", flags(toy_dir, data, 2) + [mode, "--output_dir", out, "--max_steps", "4"])
    one, two = read_metrics(pointwise_one_process), read_metrics(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 4]
    for a, b in zip(one, two):
        for k in ("loss", "grad_norm", "rewards/positive", "rewards/negative", "eval_loss", "eval_rewards/positive"):
            if k in a:  # (each process packs its own pairs into rows: sums rounded in another order)
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
    assert one[-1]["loss"] != one[1]["loss"]  # the weights did move

    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(pointwise_one_process).state_dict()
    for directory in (out, os.path.join(out, "checkpoint-4")):  # whole save_pretrained directories
        b = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (directory, k)


# ---------------------------------------------------------------- distilled_dpo.py
def test_distilled_two_processes_train_teachers_margins_samples_and_policy(toy_dir, data, tmp_path):
    """Every stage under 2 processes (DDP): two reward models trained, their margins computed each rank its share,
    the reference samples of the forward KL drawn each rank its share, the policy trained; the gathered margins
    and sample log-probs are those one process computes from the saved reward models and the initial model."""
    import distilled_dpo
    from common import collate, load_model, sequence_logps
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    out = str(tmp_path / "run")
    torchrun("distilled_dpo.py", flags(toy_dir, data, 2) + [
        "--ddp", "--output_dir", out, "--max_steps", "2", "--objective", "ensemble", "--num_reward_models", "2",
        "--calibration", "none", "--gamma", "0.1", "--max_new_tokens", "8", "--rm_learning_rate", "3e-4"])
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2] and os.path.isdir(os.path.join(out, "checkpoint-2"))
    AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2"))

    args = distilled_dpo.parse_args(flags(toy_dir, data, 2) + ["--objective", "ensemble"])
    tokenizer = distilled_dpo.load_tokenizer(args.model)
    _, _, train_rows, held_out_rows = distilled_dpo.load_data(args, tokenizer)
    margins = torch.load(os.path.join(out, "margins.pt"), weights_only=False)
    assert margins["raw_train"].shape == (64, 2) and margins["raw_eval"].shape == (15, 2)  # 15: one share padded
    for k in range(2):
        teacher = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, f"reward_model_{k}"))
        assert teacher.config.num_labels == 1
        expected = distilled_dpo.model_margins(os.path.join(out, f"reward_model_{k}"), [train_rows, held_out_rows], args, "cpu")
        assert torch.allclose(margins["raw_train"][:, k], expected[0], atol=1e-5)
        assert torch.allclose(margins["raw_eval"][:, k], expected[1], atol=1e-5)
    assert margins["raw_train"].std() > 0

    samples = torch.load(os.path.join(out, "reference_samples.pt"), weights_only=False)
    prompts = {json.loads(line)["prompt"] for line in open(os.path.join(data, "train.jsonl"))}
    assert len(samples["prompts"]) == len(samples["responses"]) == len(samples["logps"]) == len(prompts) == 33  # odd
    initial = load_model(os.path.join(toy_dir, "sft"), "float32", "cpu").eval()
    with torch.no_grad():
        batch = collate(list(zip(samples["prompts"], samples["responses"])), tokenizer.pad_token_id)
        assert torch.allclose(sequence_logps(initial, batch)[0], samples["logps"], atol=1e-4)


def test_d2po_resumed_under_fsdp_ends_like_an_uninterrupted_ddp_run_and_asks_each_gold_label_once(toy_dir, tmp_path):
    """Each rank samples its share of a step's prompts from a seed of the step's and the rank's own, so a run's
    samples do not depend on DDP or FSDP2 nor on a resume: the same gold labels, losses and weights."""
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        pairs.write_text("".join(f.readlines()[:80]))
    run = lambda out, *extra: torchrun("d2po.py", [
        "--model", os.path.join(toy_dir, "sft"), "--dataset", str(pairs), "--gold", "toy", "--output_dir", str(out),
        "--batch_size", "2", "--grad_accum", "1", "--learning_rate", "1e-3", "--warmup_steps", "1",
        "--max_new_tokens", "16", "--gold_per_window", "3", "--window_pairs", "8", "--gold_budget", "7",
        "--disc_epochs", "1", "--disc_learning_rate", "1e-3", "--eval_every", "2", "--save_every", "2", *extra])
    run(tmp_path / "ddp", "--ddp", "--max_steps", "4")
    run(tmp_path / "fsdp", "--fsdp", "--max_steps", "2")
    run(tmp_path / "fsdp", "--fsdp", "--max_steps", "4", "--resume")
    whole, resumed = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in whole] == [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        for k in ("loss", "grad_norm", "gold/used", "disc/loss", "eval_loss"):
            if a.get(k) is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k)
    assert whole[-1]["gold/used"] > 0 and whole[-1]["disc/loss"] is not None  # the discriminator was trained
    for name in ("model.safetensors", "discriminator/model.safetensors"):
        a, b = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "fsdp" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    gold = lambda out: [json.loads(line)["key"] for line in open(out / "gold.jsonl")]
    assert len(set(gold(tmp_path / "fsdp"))) == len(gold(tmp_path / "fsdp")) == whole[-1]["gold/used"]
    assert sorted(gold(tmp_path / "fsdp")) == sorted(gold(tmp_path / "ddp"))


def test_d2po_asks_a_reward_model_judge_on_rank_0_alone(toy_dir, tmp_path):
    """The judge lives on rank 0 and scores a step's pairs there by itself (no collective the other ranks would have
    to join): a run under torchrun finishes, and every label is the judge's order of the pair's two scores."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from common import load_tokenizer
    tokenizer = load_tokenizer(os.path.join(toy_dir, "sft"))
    torch.manual_seed(3)
    judge = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval()
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        pairs.write_text("".join(f.readlines()[:40]))
    torchrun("d2po.py", ["--model", os.path.join(toy_dir, "sft"), "--dataset", str(pairs), "--gold", f"rm:{tmp_path / 'judge'}",
                         "--labels", "gold", "--output_dir", str(tmp_path / "run"), "--batch_size", "3", "--max_new_tokens", "8",
                         "--max_steps", "2", "--eval_every", "2", "--ddp"])
    gold = [json.loads(line) for line in open(tmp_path / "run" / "gold.jsonl")]
    assert len(gold) >= 4  # two steps of 2 x 3 prompts, less pairs of two identical samples
    for g in gold:
        with torch.no_grad():
            a, b = [judge(input_ids=torch.tensor([tokenizer(g["prompt"] + g[k])["input_ids"]])).logits[0, 0].item()
                    for k in ("response_a", "response_b")]
        assert g["label"] == ("a" if a > b else "b" if b > a else "tie")
