"""Every command the documentation shows for the five scripts runs as shown (STYLE.md, point 11): a toy command
that stops, or a real-model command with a flag that does not exist or a bad value, fails a test here, which
names the file and line it is documented at.

Where commands are found: README.md, docs/*.md, bench/README.md, and the module docstrings of the five scripts.

Extraction (documented_commands below):
1. Markdown: each line of a fenced code block, and the text of each inline `code span` (one that wraps across lines
   is joined with a space). A docstring: each line whose text, stripped, starts a command (prose is not read).
2. A line ending in a backslash continues on the next one. A leading shell prompt `$ ` is dropped.
3. A line is cut at `&&` and `;`; each piece of the form [NAME=value ...] python <file>.py ... or
   [NAME=value ...] torchrun [its flags] <file>.py ... is a command. `# ...` to the end of a line is a comment.
4. Commands of the five scripts are checked. scripts/*.py commands are multi-minute experiment drivers: listed
   (DRIVERS) and checked only to name a file that exists. bench/*.py, toy.py and `python -m ...` are not checked.

What is run (documented_checks below):
5. Toy: no --dataset, not under torchrun, and --model absent or a run directory (runs/...). Run in this process
   as the script's main(argv) (as tests/test_runs.py and test_d2po.py call it), in a fresh temporary working
   directory (so `--output_dir out` and the default runs/<script>-<time> land there; an absolute --output_dir is
   replaced by one there), with:
   - the toy task cut small: toy.ensure_built returns a copy of the toy's directory with its first 64 training
     pairs, 16 held-out pairs, 8 test prompts and 80 labelled completions (the model is the toy's own). No flag
     bounds the toy evaluation (512 prompts sampled before and after training), the reference log-probs of every
     pair, or distilled_dpo.py's reward-model training (--rm_epochs over the whole training set); the data does.
   - BOUNDS appended, each only where the command does not give that flag itself (a documented flag always wins):
     --max_steps 2, and dice.py's sampling (--max_prompts 12 --num_samples 4 --min_valid 2). Nothing else: a flag that
     could mask a documented failure (--initial_gold, --gold_budget, --labels ...) is never appended.
   - NAME=value prefixes set in os.environ for the run.
   A toy command passes when main returns and the run's directory holds its final model.
6. Real model (everything else), and --help: parsed only, by the parser main() itself calls (parse_args), which
   exits on an unknown flag or a bad value before anything is read; --help must exit 0. No model or dataset is loaded.
7. Placeholders. `<the same flags>`: the flags of the nearest earlier command of the same script in the same file
   (after its own resolution), less its --output_dir and --resume; with none it is skipped, with that reason.
   `runs/<script>-<time>`: the toy command `python <script>.py` is run first in the same directory, and its run
   directory (runs/<script>-<date>-<time>) is put in. A value in capitals (`--seed S`, `--model M`) is replaced
   by the value the script takes when that flag is left out, where it has one (`--seed S` -> 0); otherwise it is
   kept as written (`--model M`, a string, is fine for the parser).
8. A toy command with --resume is run after its command without --resume, in the same directory.
9. Toy commands that parse to the same settings (`python dpo.py`, `OMP_NUM_THREADS=1 python dpo.py`, `python dpo.py
   --seed S`) are one run, named by every place they are documented; OMP_NUM_THREADS is not part of what makes
   two runs differ (this process already runs on one thread, conftest.py).
"""
import ast
import contextlib
import dataclasses
import glob
import importlib
import inspect
import io
import itertools
import os
import re
import shlex
import shutil
import traceback

import pytest

import toy
from conftest import ROOT

SCRIPTS = ("dpo.py", "d2po.py", "dice.py", "pointwise_dpo.py", "distilled_dpo.py")
MARKDOWN = ("README.md", "docs/*.md", "bench/README.md")
BOUNDS = {script: ["--max_steps", "2"] for script in SCRIPTS}  # appended where the command does not give the flag
BOUNDS["dice.py"] += ["--max_prompts", "12", "--num_samples", "4", "--min_valid", "2"]  # 12 prompts x 4 samples a round
MINI_TOY = {"train_pairs.jsonl": 64, "test_pairs.jsonl": 16, "test_prompts.jsonl": 8, "unpaired.jsonl": 80}  # lines
SAME_ENV = ("OMP_NUM_THREADS",)  # prefixes that do not make two toy runs differ (one thread here anyway)
LAUNCHER = re.compile(r"(?:python3?|torchrun)$")
ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"[A-Z]$")
SAME_FLAGS = "<the same flags>"
RUN_DIR = re.compile(r"^runs/(\w+)-<time>$")


@dataclasses.dataclass
class Command:
    where: str  # file:line
    text: str  # as documented, one line
    env: dict
    launcher: str  # python or torchrun
    file: str  # the .py it runs, as written
    argv: list  # its flags, SAME_FLAGS kept as one item


# ---------------------------------------------------------------- extraction: rules 1-4
def markdown_snippets(path):
    """(line, text) of each fenced code line and each inline code span of a markdown file."""
    with open(path) as f:
        lines = f.read().split("\n")
    snippets, fenced, prose = [], False, []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            prose.append("")
        elif fenced:
            snippets.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)  # the same line numbers, code blocks blanked
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        snippets.append((text.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")))
    return sorted(snippets)


def docstring_snippets(path):
    """(line, text) of each line of a module's docstring, numbered as in the file (read from the source, so a
    line-ending backslash is still there)."""
    with open(path) as f:
        source = f.read()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{path} has no module docstring"
    lines = source.split("\n")
    raw = re.match(r"[rR]", lines[node.value.lineno - 1][node.value.col_offset:])
    unescape = (lambda line: line) if raw else (lambda line: line.replace("\\\\", "\\"))  # \\ in the source is one \
    return [(n, unescape(lines[n - 1])) for n in range(node.value.lineno, node.value.end_lineno + 1)]


def joined(snippets):
    """Continued lines (a trailing backslash) joined onto the line they start on."""
    out, pending = [], None
    for number, text in snippets:
        if pending:
            pending = (pending[0], pending[1] + " " + text.strip())
        else:
            pending = (number, text.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
        else:
            out.append(pending)
            pending = None
    return out + ([pending] if pending else [])


def parse_command(where, piece):
    """A Command, or None when the piece does not run a .py file with python or torchrun."""
    piece = re.sub(r"^\$\s+", "", piece.strip())
    try:
        words = shlex.split(piece.replace(SAME_FLAGS, "__SAME_FLAGS__"), comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return None
    env = {}
    while words and ENV.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words or not LAUNCHER.match(words[0]):
        return None
    launcher, rest = words[0], words[1:]
    while rest and launcher == "torchrun" and rest[0].startswith("-"):  # torchrun's own flags
        rest = rest[1:]
    if not rest or not rest[0].endswith(".py"):
        return None  # python -m ..., python -c ...
    argv = [SAME_FLAGS if w == "__SAME_FLAGS__" else w for w in rest[1:]]
    text = re.sub(r"\s+#.*$", "", piece).strip()
    return Command(where, text, env, launcher, rest[0], argv)


def documented_commands():
    """Every command of a .py file that the documentation shows, in the order of the files and lines."""
    sources = [(p, markdown_snippets) for pattern in MARKDOWN for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]
    sources += [(os.path.join(ROOT, s), docstring_snippets) for s in SCRIPTS]
    commands = []
    for path, snippets in sources:
        for number, text in joined(snippets(path)):
            if path.endswith(".py") and not re.match(r"(?:[A-Za-z_]\w*=\S*\s+)*(?:python3?|torchrun)\s", text):
                continue  # in a docstring only lines that start a command (rule 1)
            for piece in re.split(r"&&|;", text):
                command = parse_command(f"{os.path.relpath(path, ROOT)}:{number}", piece)
                commands += [command] if command else []
    return commands


COMMANDS = documented_commands()
DRIVERS = [c for c in COMMANDS if c.file.startswith("scripts/")]


# ---------------------------------------------------------------- what is run: rules 5-9
def module(script):
    return importlib.import_module(script[:-3])


def parser_of(script):
    """The function main() parses its argv with."""
    name = re.search(r"args = (\w+)\(argv\)", inspect.getsource(module(script).main)).group(1)
    return getattr(module(script), name)


def flag_value(argv, name):
    for i, a in enumerate(argv):
        if a in (f"--{name}", f"--{name.replace('_', '-')}") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith((f"--{name}=", f"--{name.replace('_', '-')}=")):
            return a.split("=", 1)[1]
    return None


def without(script, argv, *names):
    """argv less the flags named, each with its value (a switch, a bool field of Args, has none)."""
    switches = {f.name for f in dataclasses.fields(module(script).Args) if f.type is bool}
    out, skip = [], False
    for a in argv:
        flag = a.split("=")[0][2:].replace("-", "_") if a.startswith("--") else None
        if skip:
            skip = False
        elif flag in names:
            skip = "=" not in a and flag not in switches
        else:
            out.append(a)
    return out


def resolve_placeholders(script, argv):
    """Capital placeholders (--seed S) replaced by the value the script takes without those flags (rule 7)."""
    at = [i for i in range(1, len(argv)) if PLACEHOLDER.match(argv[i]) and argv[i - 1].startswith("--")]
    names = [argv[i - 1][2:].replace("-", "_") for i in at]
    if not at:
        return list(argv)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            plain = parser_of(script)(without(script, argv, *names))
    except SystemExit:  # (say --dataset without --model: no value to take, each kept as written)
        plain = None
    out = list(argv)
    for i, name in zip(at, names):
        value = getattr(plain, name, None)
        out[i] = argv[i] if value is None else str(value)
    return out


@dataclasses.dataclass
class Check:
    kind: str  # "toy" (run), "parse" (real model), "help", "skip"
    script: str
    argv: list
    env: dict
    commands: list  # the documented Commands it checks
    note: str = ""

    @property
    def where(self):
        return "; ".join(f"{c.where}: `{c.text}`" for c in self.commands)


def is_toy(command, argv):
    model = flag_value(argv, "model")
    return (command.launcher != "torchrun" and flag_value(argv, "dataset") is None
            and (model is None or model.startswith("runs/")) and "--help" not in argv)


def documented_checks():
    """One Check per distinct toy run and per real-model / --help command, <the same flags> resolved."""
    checks, seen, last = [], {}, {}
    for command in COMMANDS:
        script = os.path.basename(command.file)
        if command.file != script or script not in SCRIPTS:
            continue  # scripts/*.py, bench/*.py, toy.py
        argv, note = list(command.argv), ""
        if SAME_FLAGS in argv:
            earlier = last.get((command.where.split(":")[0], script))
            if earlier is None:
                reason = f"{SAME_FLAGS} with no earlier command of {script} in this file"
                checks.append(Check("skip", script, argv, command.env, [command], reason))
                continue
            i = argv.index(SAME_FLAGS)
            argv = argv[:i] + without(script, earlier[0], "output_dir", "resume") + argv[i + 1:]
            note = f"{SAME_FLAGS} = the flags of {earlier[1]}"
        last[(command.where.split(":")[0], script)] = (argv, command.where)
        argv = resolve_placeholders(script, argv)
        kind = "help" if "--help" in argv or "-h" in argv else "toy" if is_toy(command, argv) else "parse"
        if kind != "toy":
            checks.append(Check(kind, script, argv, command.env, [command], note))
            continue
        try:  # rule 9: the same settings, the same run
            with contextlib.redirect_stderr(io.StringIO()):
                settings = repr(dataclasses.asdict(parser_of(script)(argv)))
        except SystemExit:
            settings = repr(argv)
        key = (script, settings, tuple(sorted((k, v) for k, v in command.env.items() if k not in SAME_ENV)))
        if key in seen:
            seen[key].commands.append(command)
        else:
            seen[key] = Check("toy", script, argv, command.env, [command], note)
            checks.append(seen[key])
    return checks


CHECKS = documented_checks()


def check_id(check):
    return f"{check.commands[0].where} {check.script} {' '.join(check.argv)}"[:120]


# ---------------------------------------------------------------- the tests
def test_the_extraction_finds_commands_of_every_script():
    toys = {s: [c for c in CHECKS if c.kind == "toy" and c.script == s] for s in SCRIPTS}
    parsed = {s: [c for c in CHECKS if c.kind in ("parse", "help") and c.script == s] for s in SCRIPTS}
    listing = "\n".join(f"{c.kind:5} {c.where} -> {c.script} {' '.join(c.argv)} {c.note}" for c in CHECKS)
    for script in SCRIPTS:
        assert toys[script], f"no toy command of {script} found; found:\n{listing}"
        assert parsed[script], f"no real-model command of {script} found; found:\n{listing}"
        docstring = [c for c in COMMANDS if c.where.startswith(f"{script}:") and c.file == script]
        assert len(docstring) >= 3, f"{script}'s docstring gives {len(docstring)} commands (toy, real model, torchrun)"
    readme = [c for c in COMMANDS if c.where.startswith("README.md:") and c.file in SCRIPTS]
    assert len(readme) >= 15, f"README.md: only {len(readme)} commands of the five scripts found"
    assert sum(map(len, toys.values())) >= 8, listing


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda c: f"{c.where} {c.file}")
def test_a_documented_experiment_driver_exists(driver):
    assert os.path.isfile(os.path.join(ROOT, driver.file)), f"{driver.where}: `{driver.text}` names no such file"


@pytest.mark.parametrize("check", [c for c in CHECKS if c.kind != "toy"], ids=check_id)
def test_a_documented_real_model_command_parses(check):
    if check.kind == "skip":
        pytest.skip(f"{check.where}: {check.note}")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser_of(check.script)(check.argv)
    except SystemExit as stopped:
        if check.kind == "help" and stopped.code in (0, None):
            return
        said = stopped.code if isinstance(stopped.code, str) else (stderr.getvalue().strip().splitlines() or ["?"])[-1]
        raise AssertionError(f"{check.where} ({check.note or 'as written'})\n  parsed {check.script} "
                             f"{shlex.join(check.argv)}\n  and its parser refused it: {said}") from None
    assert check.kind != "help", f"{check.where}: --help did not exit"


@pytest.fixture(scope="session")
def mini_toy(toy_dir, tmp_path_factory):
    """The toy's directory with the first lines of each data file (MINI_TOY) and the toy's own model."""
    mini = tmp_path_factory.mktemp("mini_toy")
    for name, lines in MINI_TOY.items():
        with open(os.path.join(toy_dir, name)) as f, open(mini / name, "w") as g:
            g.writelines(itertools.islice(f, lines))
    shutil.copy(os.path.join(toy_dir, "meta.json"), mini / "meta.json")
    (mini / "sft").symlink_to(os.path.join(toy_dir, "sft"))
    return str(mini)


def run_toy(script, argv, where):
    """main(argv + BOUNDS) in the working directory; returns the run's directory."""
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    bounds = [a for flag, value in zip(BOUNDS[script][::2], BOUNDS[script][1::2]) if flag[2:] not in given
              for a in (flag, value)]
    before = set(glob.glob("runs/*"))
    try:
        module(script).main(argv + bounds)
    except (Exception, SystemExit) as error:
        detail = error.code if isinstance(error, SystemExit) else "".join(traceback.format_exception(error)[-3:])
        ran = shlex.join(argv + bounds)
        raise AssertionError(f"{where}\n  ran {script} {ran} (in this process)\n  and it stopped: {detail}") from None
    out = flag_value(argv, "output_dir") or (sorted(set(glob.glob("runs/*")) - before) or ["(no run directory)"])[0]
    assert os.path.exists(os.path.join(out, "model.safetensors")), f"{where}: {script} wrote no final model in {out}"
    return out


@pytest.mark.parametrize("check", [c for c in CHECKS if c.kind == "toy"], ids=check_id)
def test_a_documented_toy_command_runs(check, mini_toy, tmp_path, monkeypatch):
    real = toy.ensure_built
    monkeypatch.setattr(toy, "ensure_built", lambda directory=None: real(mini_toy))
    monkeypatch.chdir(tmp_path)
    for name, value in check.env.items():
        monkeypatch.setenv(name, value)
    argv = list(check.argv)
    for i, value in enumerate(argv):
        if i and argv[i - 1] in ("--output_dir", "--output-dir") and os.path.isabs(value):
            argv[i] = str(tmp_path / "out")  # an absolute --output_dir: here instead (rule 5)
        match = RUN_DIR.match(value)
        if match:  # rule 7: the run it starts from is made first
            base = f"{match.group(1)}.py"
            argv[i] = run_toy(base, [], f"{check.where} (making {value} with `python {base}`)")
    if "--resume" in argv:  # rule 8
        run_toy(check.script, without(check.script, argv, "resume"), f"{check.where} (its run before --resume)")
    run_toy(check.script, argv, check.where)


def test_the_extraction_rules_on_a_sample(tmp_path):
    (tmp_path / "sample.md").write_text(
        "Run `OMP_NUM_THREADS=1 python dpo.py\n--seed S` or `python toy.py`, not `python -m pytest`.\n"
        "```bash\n"
        "pip install x && python dice.py --rounds 1   # a comment\n"
        "$ torchrun --nproc_per_node=8 d2po.py --model M \\\n"
        "    --output_dir out    # continued\n"
        "python dpo.py <the same flags> --resume\n"
        "toy task, 512 test prompts\n"
        "```\n")
    found = [(n, c.env, c.launcher, c.file, c.argv) for n, text in joined(markdown_snippets(tmp_path / "sample.md"))
             for piece in re.split(r"&&|;", text) for c in [parse_command(str(n), piece)] if c]
    assert found == [(1, {"OMP_NUM_THREADS": "1"}, "python", "dpo.py", ["--seed", "S"]),
                     (2, {}, "python", "toy.py", []),
                     (4, {}, "python", "dice.py", ["--rounds", "1"]),
                     (5, {}, "torchrun", "d2po.py", ["--model", "M", "--output_dir", "out"]),
                     (7, {}, "python", "dpo.py", [SAME_FLAGS, "--resume"])]
    assert resolve_placeholders("dpo.py", ["--seed", "S", "--model", "M"]) == ["--seed", "0", "--model", "M"]
