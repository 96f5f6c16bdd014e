"""The five scripts as one family: the same flags with the same meaning, the same shared code word for word, the
same closing lines on the toy task, and each one runnable when copied out of the repository with common.py alone."""
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_llama

SCRIPTS = ["dpo.py", "dice.py", "d2po.py", "pointwise_dpo.py", "distilled_dpo.py"]

# every shared flag: its type, a value to give it, and words its help must contain in every script (its meaning)
SHARED_FLAGS = {
    "model": (str, "some/model", "hub id or local directory"),
    "ref_model": (str, "some/reference", "reference model"),
    "dataset": (str, "data.jsonl", "hub name, .jsonl/.json/.parquet, or a save_to_disk folder"),
    "eval_dataset": (str, "held.jsonl", "held-out"),
    "output_dir": (str, "out", "metrics go (default: runs/"),
    "max_steps": (int, "7", "steps"),
    "epochs": (int, "3", "passes over "),
    "batch_size": (int, "5", "per micro-batch"),
    "grad_accum": (int, "3", "micro-batches per"),
    "learning_rate": (float, "3e-6", "peak learning rate"),
    "warmup_steps": (int, "4", "linear warm-up steps, then constant"),
    "beta": (float, "0.25", "KL strength beta"),
    "max_length": (int, "300", "max tokens of prompt + response"),
    "seed": (int, "5", "seed of"),
    "eval_every": (int, "9", "evaluate on the held-out"),
    "save_every": (int, "11", "write a checkpoint every N steps"),
    "resume": (bool, None, "continue the run in --output_dir"),
    "gradient_checkpointing": (bool, None, "recompute activations in backward"),
    "dtype": (str, "float32", "auto: bf16 on CUDA, fp32 on CPU"),
}


def module(script):
    return importlib.import_module(script[:-3])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_the_shared_flags_with_the_same_names_types_and_meaning(script):
    m = module(script)
    fields = {f.name: f for f in dataclasses.fields(m.Args)}
    argv = []
    for name, (kind, value, words) in SHARED_FLAGS.items():
        assert name in fields, f"{script} has no --{name}"
        assert fields[name].type is kind, f"{script}: --{name} is {fields[name].type}, not {kind}"
        assert words in fields[name].metadata["help"], f"{script}: --{name}'s help does not say {words!r}"
        argv += [f"--{name}"] + ([] if kind is bool else [value])
    argv.remove("--resume")  # (it needs a run to continue: checked by parse_args itself)
    argv += ["--gold", "human"] if script == "d2po.py" else []  # (with --model d2po.py needs its source of gold labels)
    args = m.parse_args(argv)
    for name, (kind, value, _) in SHARED_FLAGS.items():
        if name != "resume":
            assert getattr(args, name) == (True if kind is bool else kind(value)), name
    assert m.parse_args(["--max-steps", "7", "--learning-rate", "3e-6"]).max_steps == 7  # the dashed spelling too
    dpo_fields = {f.name: f for f in dataclasses.fields(module("dpo.py").Args)}
    for name in SHARED_FLAGS:  # the same choices everywhere (the dtypes)
        assert fields[name].metadata.get("choices") == dpo_fields[name].metadata.get("choices"), name


CONVERTED = SCRIPTS  # every script takes its run machinery from common.py


@pytest.mark.parametrize("script", CONVERTED)
def test_no_script_redefines_what_common_py_provides(script):
    """The run machinery lives once, in common.py: a script that defines a function or class of the same name as one
    of common.py's (a copy that would drift) fails here."""
    import ast
    import common
    provided = {name for name, value in vars(common).items()
                if getattr(value, "__module__", None) == "common" and callable(value)}
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & provided, f"{script} redefines common.py's {sorted(defined & provided)}"
    assert "TRY NOT TO MODIFY" not in open(os.path.join(ROOT, script)).read(), f"{script}: a copied section"


# ---------------------------------------------------------------- the same closing lines on the toy
CLOSING = re.compile(r"toy task, (\d+) test prompts, one sample each:\n"
                     r"  gold reward ([+-]\d+\.\d{3}) -> ([+-]\d+\.\d{3})   length (\d+\.\d) -> (\d+\.\d) words   "
                     r"KL\(policy \|\| reference\) (-?\d+\.\d\d) -> (-?\d+\.\d\d) nats\n")


@pytest.fixture(scope="module")
def toy_reward_model(toy_dir, tmp_path_factory):
    """A reward model on the toy's tokenizer (the SFT model with a fresh one-output head), so that
    distilled_dpo.py's toy run needs no teachers trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = tmp_path_factory.mktemp("rm") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(toy_dir, "sft"), num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(os.path.join(toy_dir, "sft")).pad_token_id
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(toy_dir, "sft")).save_pretrained(path)
    return str(path)


TOY_FLAGS = {"dice.py": ["--rounds", "1", "--num_samples", "4", "--min_valid", "2", "--max_prompts", "8",
                         "--max_new_tokens", "16", "--batch_size", "4"],
             "d2po.py": ["--max_new_tokens", "16", "--initial_gold", "2", "--gold_budget", "4", "--gold_per_window", "2",
                         "--window_pairs", "32", "--disc_epochs", "1"],
             "distilled_dpo.py": ["--objective", "distill"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_default_toy_run_ends_with_gold_reward_length_and_kl_in_the_same_words(script, toy_dir, toy_reward_model,
                                                                                      tmp_path, capsys):
    out = tmp_path / "run"
    extra = TOY_FLAGS.get(script, []) + (["--reward_models", toy_reward_model] if script == "distilled_dpo.py" else [])
    module(script).main(["--output_dir", str(out), "--max_steps", "2", "--toy_eval_every", "1", *extra])
    printed = capsys.readouterr().out
    found = CLOSING.findall(printed)
    assert len(found) == 1, printed[-2000:]
    prompts, g0, g1, l0, l1, kl0, kl1 = found[0]
    assert int(prompts) == 512 and float(kl0) == 0.0
    trained = out / ("round_1" if script == "dice.py" else "")
    with open(trained / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    curve = [r for r in rows if "toy/gold_reward" in r]  # --toy_eval_every 1: after step 1 (step 2 is the last)
    assert [r["step"] for r in curve] == [1]
    if script == "dice.py":
        with open(out / "round_0" / "summary.json") as f:
            before = {k[8:]: v for k, v in json.load(f).items() if k.startswith("toy/sft_")}
        with open(out / "round_1" / "summary.json") as f:
            after = {k[4:]: v for k, v in json.load(f).items() if k.startswith("toy/")}
    else:
        final = rows[-1]
        before = {k[4:-7]: v for k, v in final.items() if k.endswith("_before")}
        after = {k[4:-6]: v for k, v in final.items() if k.endswith("_after")}
    assert (g0, g1) == (f"{before['gold_reward']:+.3f}", f"{after['gold_reward']:+.3f}")
    assert (l0, l1, kl1) == (f"{before['length']:.1f}", f"{after['length']:.1f}", f"{after['kl']:.2f}")


# ---------------------------------------------------------------- one file and common.py, copied elsewhere
@pytest.fixture(scope="module")
def own_model_and_data(tokenizer, tmp_path_factory):
    """A tiny Llama with the tests' tokenizer, and small files of each data kind, none from the toy's cache."""
    import random
    import toy
    tmp = tmp_path_factory.mktemp("own")
    import torch
    rng = random.Random(1)
    words = lambda n: " " + " ".join(toy.review(rng).split()[:n])
    pairs = [{"prompt": f"review {i}:", "chosen": words(6), "rejected": words(4)} for i in range(24)]
    model = tiny_llama(vocab_size=len(tokenizer), tie=True)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # 40 steps of SFT: it learns to end its answers
    texts = [tokenizer(p["prompt"] + p["chosen"])["input_ids"] + [tokenizer.eos_token_id] for p in pairs]
    for _ in range(40):
        for ids in texts[:8]:
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs for k in ("chosen", "rejected")]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


COPY_FLAGS = {"dpo.py": ["--dataset", "pairs.jsonl"],
              "dice.py": ["--dataset", "pairs.jsonl", "--ref_model", "model", "--rounds", "1", "--num_samples", "4",
                          "--min_valid", "2", "--max_prompts", "8", "--max_new_tokens", "8"],
              "d2po.py": ["--dataset", "pairs.jsonl", "--gold", "human", "--max_new_tokens", "8", "--gold_budget", "2",
                          "--gold_per_window", "2", "--window_pairs", "32", "--disc_epochs", "1"],
              "pointwise_dpo.py": ["--dataset", "rows.jsonl"],
              "distilled_dpo.py": ["--dataset", "pairs.jsonl", "--num_reward_models", "2"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_copied_with_common_py_alone_runs_to_a_checkpoint(script, own_model_and_data, tmp_path):
    here = tmp_path / "project"
    here.mkdir()
    for name in (script, "common.py"):
        shutil.copy(os.path.join(ROOT, name), here / name)
    for name in ("model", "pairs.jsonl", "rows.jsonl"):
        (here / name).symlink_to(own_model_and_data / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DPO_TOY_DIR", "DPO_CRASH_AT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HOME=str(tmp_path / "home"))  # no toy cache to be found
    result = subprocess.run([sys.executable, script, "--model", "model", "--output_dir", "run", "--batch_size", "2",
                             "--grad_accum", "1", "--max_steps", "1", "--eval_fraction", "0.2", *COPY_FLAGS[script]],
                            cwd=here, env=env, capture_output=True, text=True, timeout=600,
                            input="1\n" * 10 if script == "d2po.py" else None)  # the human labeller: "1" each time
    assert result.returncode == 0, result.stderr[-3000:]
    trained = here / "run" / ("round_1" if script == "dice.py" else "")
    assert (trained / "checkpoint-1" / "model.safetensors").exists() or (trained / "model.safetensors").exists()
    assert set(os.listdir(here)) - {"__pycache__"} == {script, "common.py", "model", "pairs.jsonl", "rows.jsonl", "run"}


# ---------------------------------------------------------------- the files teach, and point at nothing outside
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_docstring_states_its_paper_losses_how_to_run_it_and_numbered_deviations(script):
    doc = module(script).__doc__
    assert re.search(r"https://arxiv\.org/abs/\d{4}\.\d{5}", doc.split("\n\n")[0]), "the paper, in the first paragraph"
    assert re.search(r"\bL(_\w+)? +=", doc), "a loss written out"
    run = doc[doc.index("\nRun:\n"):]
    assert f"    python {script}\n" in run or f"    python {script} " in run and f"python {script} --model" in run
    deviations = doc[doc.index("\nDeviations from the paper"):]
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", deviations, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 3, numbers


def test_the_readmes_point_at_nothing_outside_the_repository():
    for readme in ("README.md", os.path.join("bench", "README.md")):
        with open(os.path.join(ROOT, readme)) as f:
            text = f.read()
        assert not re.search(r"(?<!\.)\.\./", text) and "ALGORITHMS.md" not in text and "STYLE.md" not in text, readme
        for target in re.findall(r"\]\(([^)]+)\)", text):  # every link: the web, or a file of the repository
            assert target.startswith(("http://", "https://")) or os.path.exists(os.path.join(ROOT, target)), target
        for path in re.findall(r"`((?:scripts|bench|docs|tests)/[\w./-]+\.(?:py|png|svg|md))`", text):
            assert os.path.exists(os.path.join(ROOT, path)), f"{readme} names {path}, which is not in the repository"
