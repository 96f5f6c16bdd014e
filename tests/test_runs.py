"""What every training script owes its user, whatever the algorithm: a run killed at any instant resumes to
the weights of an uninterrupted one; bad input stops with one line that names the file, line and field,
before anything is written; a run never shares or overwrites another run's directory.

A new algorithm script joins every test here by adding its file name to SCRIPTS (it must accept the shared
flags, have main(argv) and claim_output_dir(args, record), and call common.crash_point at "reference",
"step" and "checkpoint"), with the flags it needs besides the shared ones in EXTRA_FLAGS and, if its training
loop writes checkpoints and metrics.jsonl in a subdirectory of --output_dir, that subdirectory in TRAINING_DIR."""
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

import toy
from conftest import ROOT

SCRIPTS = ["dpo.py", "dice.py", "pointwise_dpo.py", "distilled_dpo.py", "d2po.py"]
EXTRA_FLAGS = {"dice.py": ["--ref_model", os.path.join(toy.DEFAULT_DIR, "sft"), "--rounds", "1", "--num_samples", "4",
                           "--min_valid", "2", "--max_prompts", "12"],  # one round on the SFT model's own samples
               "distilled_dpo.py": ["--num_reward_models", "2", "--gamma", "0.1"],  # all three stages, two small teachers
               "d2po.py": ["--gold", "toy", "--max_new_tokens", "16", "--gold_per_window", "2", "--window_pairs", "8",
                           "--gold_budget", "10", "--disc_epochs", "1"]}  # short samples, small windows
TRAINING_DIR = {"dice.py": "round_1"}


def trained(script, out):
    """Where a script's run in `out` keeps its checkpoints and metrics.jsonl."""
    return out / TRAINING_DIR.get(script, "")
GOOD = {"prompt": "the movie was", "chosen": " great .", "rejected": " dull ."}
# bad_inputs() cases that a script words differently or does not have (None: skipped); pairs read as 2 rows a pair
BAD_INPUT_OVERRIDES = {"pointwise_dpo.py": {"label_smoothing 0.5": None,
                                            "grad_accum too large": ([GOOD] * 8, ["--grad_accum", "100"],
                                                                     ["--grad_accum 100", "only 15 training rows"])},
                       "d2po.py": {"grad_accum too large": ([GOOD] * 8, ["--grad_accum", "100"],
                                                            ["--grad_accum 100", "only 1 distinct training prompts"])}}
CRASH_POINTS = {"d2po.py": ("gold:3",)}  # kill points of a script's own, besides reference, step and checkpoint


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(toy_dir, tmp_path_factory):
    """40 of the toy's training pairs: 39 to train on (one is held out), 9 steps of 4 an epoch."""
    with open(os.path.join(toy_dir, "train_pairs.jsonl")) as f:
        lines = f.readlines()[:40]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(lines))
    return str(path)


def flags(toy_dir, data, out, *extra):
    return ["--model", os.path.join(toy_dir, "sft"), "--dataset", data, "--output_dir", str(out), "--batch_size", "4",
            "--grad_accum", "1", "--learning_rate", "1e-3", "--warmup_steps", "2", "--eval_every", "4",
            "--save_every", "3", "--max_steps", "8", *extra]


def run(script, args, crash_at=None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DPO_CRASH_AT", None)
    env.update({"DPO_CRASH_AT": crash_at} if crash_at else {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args, *EXTRA_FLAGS.get(script, [])],
                          capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600, **kwargs)


def metric_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows if "grad_norm" in r], [r["step"] for r in rows if "eval_loss" in r]


def training_rows(out):
    """The training rows logged so far by a running process (a last line may be half written)."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rows += [json.loads(line)] if "grad_norm" in line else []
    return rows


# ---------------------------------------------------------------- kills and interrupts
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_weights(script, toy_dir, data, tmp_path):
    baseline = run(script, flags(toy_dir, data, tmp_path / "baseline"))
    assert baseline.returncode == 0, baseline.stderr
    expected = load_file(str(tmp_path / "baseline" / "model.safetensors"))
    # killed (SIGKILL, no clean-up) in the reference pass, after step 5's update, and while checkpoint-6 is written
    for point in ("reference:2", "step:5", "checkpoint:2", *CRASH_POINTS.get(script, ())):
        out = tmp_path / point.replace(":", "-")
        killed = run(script, flags(toy_dir, data, out), crash_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        again = run(script, flags(toy_dir, data, out))  # a plain rerun must not reuse the killed run's directory
        assert again.returncode != 0 and "already holds files" in again.stderr
        resumed = run(script, flags(toy_dir, data, out, "--resume"))
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == expected.keys()
        for k in expected:
            assert (got[k] == expected[k]).all(), (point, k)  # bitwise on the CPU
        assert metric_steps(trained(script, out)) == ([1, 2, 3, 4, 5, 6, 7, 8], [0, 4, 8]), point  # every step logged once
        assert [d for d in os.listdir(trained(script, out)) if d.startswith("checkpoint-")] == ["checkpoint-8"]
    # a finished run resumed again does nothing and appends nothing
    before = (trained(script, tmp_path / "baseline") / "metrics.jsonl").read_bytes()
    done = run(script, flags(toy_dir, data, tmp_path / "baseline", "--resume"))
    assert done.returncode == 0 and "nothing to do" in done.stdout
    assert (trained(script, tmp_path / "baseline") / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_saves_a_checkpoint_and_prints_the_command_that_resumes(script, toy_dir, data, tmp_path):
    out = tmp_path / "run"
    args = flags(toy_dir, data, out)[:-2] + ["--max_steps", "100000", "--save_every", "100000", "--eval_every", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args, *EXTRA_FLAGS.get(script, [])], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(training_rows(trained(script, out))) < 2:  # signalled mid-training
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = metric_steps(trained(script, out))[0][-1]
    assert os.path.isdir(trained(script, out) / f"checkpoint-{step}")  # saved at the step it stopped after
    command = stderr.strip().splitlines()[-1].split("Continue with: ")[1]
    python, path, *resume_args = command.split()
    assert python == "python" and path.endswith(script) and resume_args[-1] == "--resume"
    resumed = run(script, resume_args + ["--max_steps", str(step + 2)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metric_steps(trained(script, out))[0] == list(range(1, step + 3))


# ---------------------------------------------------------------- one run, one directory
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_changed_settings_and_inputs(script, toy_dir, data, tmp_path):
    out, copy = tmp_path / "run", tmp_path / "pairs.jsonl"
    shutil.copy(data, copy)
    assert run(script, flags(toy_dir, str(copy), out, "--max_steps", "2")).returncode == 0
    for extra, named in ((["--learning_rate", "2e-3"], "--learning_rate differs from the run in"),
                         (["--batch_size", "2"], "--batch_size differs from the run in"),
                         (["--max_length", "64"], "(512 there, 64 here)"), (["--seed", "1"], "--seed differs")):
        result = run(script, flags(toy_dir, str(copy), out, "--max_steps", "2", "--resume", *extra))
        assert result.returncode != 0 and named in result.stderr, (extra, result.stderr[-500:])
    with open(copy, "a") as f:
        f.write(json.dumps(GOOD) + "\n")  # same path, one more row
    result = run(script, flags(toy_dir, str(copy), out, "--max_steps", "2", "--resume"))
    assert result.returncode != 0 and "the content of --dataset differs" in result.stderr, result.stderr[-500:]
    shutil.copy(data, copy)
    # the flags a resume may change: more steps continue the run, evaluated and saved at the new intervals
    more = run(script, flags(toy_dir, str(copy), out, "--max_steps", "3", "--resume", "--eval_every", "1", "--save_every", "1"))
    assert more.returncode == 0, more.stderr[-2000:]
    assert metric_steps(trained(script, out)) == ([1, 2, 3], [0, 2, 3])


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_started_together_never_share_a_directory(script, tmp_path, monkeypatch):
    module = importlib.import_module(script[:-3])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "runs/x-same-second")  # two runs in one second
    first, second = module.parse_args([]), module.parse_args([])
    claim = module.claim_output_dir  # common.claim_output_dir(args, record, the script's name)
    assert claim(first, {}, script[:-3]) == "runs/x-same-second"
    assert claim(second, {}, script[:-3]) == "runs/x-same-second-1"
    explicit = module.parse_args(["--output_dir", "runs/x-same-second"])
    with pytest.raises(SystemExit, match="taken by another run"):
        claim(explicit, {}, script[:-3])


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_explicit_flag_wins_over_the_toy_defaults(script):
    module = importlib.import_module(script[:-3])
    toy, plain = module.parse_args([]), module.Args()
    changed = {name for name, value in module.TOY_DEFAULTS.items()  # (a flag without a general default cannot be
               if value != getattr(plain, name) and getattr(plain, name) is not None}  # given at it: d2po's --gold)
    assert changed  # the toy does change some defaults
    argv = [a for name in changed for a in (f"--{name}", str(getattr(plain, name)))]
    explicit = module.parse_args(argv)  # each given at its general default: it must stay there
    for name in changed:
        assert getattr(toy, name) == module.TOY_DEFAULTS[name] and getattr(explicit, name) == getattr(plain, name), name


# ---------------------------------------------------------------- bad input: one line, non-zero, nothing written
def bad_inputs(toy_dir, tmp):
    """(files to write, flags, what the message must say) for each mistake a user makes."""
    sft = os.path.join(toy_dir, "sft")
    good = [GOOD] * 8
    chat = lambda role, text: [{"role": role, "content": text}]
    (tmp / "not_a_model").mkdir()
    for name in os.listdir(sft):
        if name.startswith(("tokenizer", "chat_template", "special")):
            shutil.copy(os.path.join(sft, name), tmp / "not_a_model")
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    lines = [json.dumps(GOOD)] * 2 + ['{"prompt": "a", "chosen": "b", "rejected": "c"'] + [json.dumps(GOOD)] * 4
    (tmp / "cut.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    (tmp / "data.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    (tmp / "broken.parquet").write_text("not parquet")
    return {
        "non-JSON line": ("cut.jsonl", [], ["cut.jsonl: line 3: not valid JSON"]),
        "non-UTF-8 line": ("latin1.jsonl", [], ["latin1.jsonl: line 2: not UTF-8"]),
        "missing file": ("nowhere.jsonl", [], ["nowhere.jsonl: no such file", ".jsonl"]),
        "directory": ("empty_dir", [], ["empty_dir", "a dataset is"]),
        "csv": ("data.csv", [], ["data.csv", "not read", ".parquet"]),
        "broken parquet": ("broken.parquet", [], ["broken.parquet", "could not load"]),
        "missing eval file": (good, ["--eval_dataset", str(tmp / "gone.jsonl")], ["gone.jsonl: no such file"]),
        "missing key": (good[:3] + [{"prompt": "a", "chosen": "b"}], [], ["line 4: field 'rejected': missing"]),
        "string prompt, chat responses": (good[:2] + [{"prompt": "hi", "chosen": chat("assistant", "a"),
                                                       "rejected": chat("assistant", "b")}],
                                          [], ["line 3: field 'prompt': text, while field 'chosen' is chat"]),
        "unknown chat role": (good[:1] + [{"prompt": chat("wizard", "hi"), "chosen": chat("assistant", "a"),
                                           "rejected": chat("assistant", "b")}], [], ["line 2: field 'prompt'", "role"]),
        "wrong type": (good[:5] + [{**GOOD, "chosen": 5}], [], ["line 6: field 'chosen': expected a string"]),
        "model path missing": (good, ["--model", str(tmp / "no_model")], ["no_model: no such directory"]),
        "not a causal LM": (good, ["--model", str(tmp / "not_a_model")], ["not_a_model", "could not load a causal LM"]),
        "output_dir is a file": (good, ["--output_dir", str(tmp / "a_file")], ["a_file is a file"]),
        "output_dir not writable": (good, ["--output_dir", str(tmp / "a_file" / "run")], ["cannot write in"]),
        "batch_size 0": (good, ["--batch_size", "0"], ["--batch_size must be at least 1 (got 0)"]),
        "learning_rate 0": (good, ["--learning_rate", "0"], ["--learning_rate must be a positive number"]),
        "negative learning_rate": (good, ["--learning_rate=-1e-6", True], ["--learning_rate must be a positive number"]),
        "save_every 0": (good, ["--save_every", "0"], ["--save_every must be at least 1"]),
        "negative max_steps": (good, ["--max_steps", "-5"], ["--max_steps must be at least 1"]),
        "beta 0": (good, ["--beta", "0"], ["--beta must be a positive number"]),
        "label_smoothing 0.5": (good, ["--label_smoothing", "0.5"], ["--label_smoothing must be in [0, 0.5)"]),
        "grad_accum too large": (good, ["--grad_accum", "100"], ["--grad_accum 100", "only 7 training pairs"]),
        "dataset without model": (good, ["--model", None], ["--dataset needs --model"]),
        "toy curve without the toy": (good, ["--toy_eval_every", "2"], ["--toy_eval_every is for the built-in toy task"]),
        "resume with nothing to resume": (good, ["--resume", True], ["no run to continue"]),
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_stops_with_one_line_and_writes_nothing(script, toy_dir, tmp_path):
    module = importlib.import_module(script[:-3])
    cases = {**bad_inputs(toy_dir, tmp_path), **BAD_INPUT_OVERRIDES.get(script, {})}
    for name, (dataset, extra, expected) in ((k, v) for k, v in cases.items() if v is not None):
        dataset = write_rows(tmp_path / f"{name}.jsonl", dataset) if isinstance(dataset, list) else str(tmp_path / dataset)
        out = tmp_path / f"out-{name}"
        given = {"--model": os.path.join(toy_dir, "sft"), "--dataset": dataset, "--output_dir": str(out),
                 "--batch_size": "1", "--grad_accum": "1", **dict(zip(EXTRA_FLAGS.get(script, [])[::2], EXTRA_FLAGS.get(script, [])[1::2])),
                 **dict(zip(extra[::2], extra[1::2]))}
        argv = [a for k, v in given.items() if v is not None for a in ((k,) if v is True else (k, v))]  # None: left out
        with pytest.raises(SystemExit) as stopped:
            module.main(argv)
        message = stopped.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, (name, message)
        for part in expected:
            assert part in message, (name, message)
        assert not out.exists(), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_on_the_command_line_the_error_is_the_only_line_on_stderr(script, toy_dir, tmp_path):
    lines = [json.dumps(GOOD)] * 3 + ["{not json"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    result = run(script, flags(toy_dir, str(tmp_path / "d.jsonl"), tmp_path / "out"))
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'd.jsonl'}: line 4: not valid JSON "
                                                  f"(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]


# generated rows: missing and extra fields, wrong types, empty strings, NaN, unknown roles, mixed formats, raw bytes
text = st.text(max_size=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "wizard", ""]),
                                 "content": st.one_of(text, st.integers(), st.none())})
value = st.one_of(text, st.lists(message, max_size=3), st.integers(), st.floats(), st.none(), st.booleans(),
                  st.lists(text, max_size=2), st.dictionaries(text, text, max_size=2))
good_row = st.fixed_dictionaries({"prompt": st.sampled_from(["the movie", "i think", "honestly the plot"]),
                                  "chosen": st.sampled_from([" was great .", " felt warm ."]),
                                  "rejected": st.sampled_from([" was dull .", " was slow ."])})
any_row = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), value)
line = st.one_of(good_row.map(json.dumps), good_row.map(json.dumps), any_row.map(json.dumps),
                 st.binary(min_size=1, max_size=12).map(lambda b: b.decode("latin-1")))


class Reached(Exception):
    """Raised in place of claiming the output directory: every check before it passed."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_generated_rows_load_or_stop_with_one_line_before_anything_is_written(script, toy_dir, tmp_path_factory):
    module = importlib.import_module(script[:-3])
    original = module.claim_output_dir

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(line, min_size=1, max_size=6))
    def check(lines):
        tmp = tmp_path_factory.mktemp("rows")
        path, out = tmp / "rows.jsonl", tmp / "out"
        path.write_bytes("\n".join(lines).encode("latin-1", errors="replace") + b"\n")
        try:
            module.main(["--model", os.path.join(toy_dir, "sft"), "--dataset", str(path), "--output_dir", str(out),
                         "--batch_size", "1", "--grad_accum", "1", *EXTRA_FLAGS.get(script, [])])
        except Reached:
            pass
        except SystemExit as stopped:
            assert isinstance(stopped.code, str) and stopped.code.startswith("error: "), stopped.code
            assert "\n" not in stopped.code and ("rows.jsonl" in stopped.code or "--" in stopped.code), stopped.code
        assert not out.exists()

    module.claim_output_dir = lambda *args: (_ for _ in ()).throw(Reached())
    try:
        check()
    finally:
        module.claim_output_dir = original
