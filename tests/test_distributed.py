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
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-5), (a["step"], k)
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
