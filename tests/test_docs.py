"""Every code block of README.md and docs/, checked without computing, in the order a reader meets them.

Each page is followed on its own copy of the project (a git repository, as a clone is):
- ```bash blocks: every command is checked. State-changing ones act on the copy as they would for
  the reader: `dvc exp run -S` applies its settings to params.yaml with DVC's own parser and
  override code, `make run PROFILE=` writes the profile, `git checkout` restores a file, a
  ```yaml params merge block edits params.yaml; `make check` and `make run` run the check stage
  (the first stage of every run). What would compute for minutes (the rest of `dvc repro`, tests,
  training scripts) is checked for what it names: targets, stages, modules, flags and paths.
- ```yaml params blocks are fragments of params.yaml, validated by the schema; profile=<name> blocks
  hold the values that profile gives; excerpt=<path>
  blocks must be lines of that file; file=, append-to= and insert-after= blocks edit the copy
  (tests/project.py apply_edit). ```text blocks are output and pictures: not checked.
- Inline code in the prose: a dotted setting name must be a setting of the schema, and a
  `dvc ...`/`make ...` command is checked as a block's would be (without changing the copy).
docs/design/contributing.md's walkthrough is also run through DVC by tests/test_walkthrough.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline import profiles
from pipeline.planner import lookup
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.params_file import Params, load_params
from pipeline.settings.sft import SFTSettings
from tests.project import EDITS, apply_edit, code_blocks, commit_all, copy_project
from tools import settings_reference
from tools.settings_reference import OVERRIDES_SECTION

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").rglob("*.md"))]
MAKE_TARGETS = set(re.findall(r"^([a-z][a-z-]*):", (PROJECT_ROOT / "Makefile").read_text(), re.MULTILINE))
MAKE_VARIABLES = {"PROFILE", "PYTHON", "REV"}
# programs a page may name whose effect the test does not follow (their path arguments are checked)
UNFOLLOWED = {"git", "sky", "export", "source", "cd", "cat", "ls", "cp", "mkdir", "pip", "uv", "apt-get", "echo"}
# path arguments checked against the project: the first folder must be one of these
PROJECT_FOLDERS = {"data", "models", "metrics", "profiles", "launch", "stages", "pipeline", "tests", "bench",
                   "tools", "requirements", "docs", ".dvc", ".ci"}  # fmt: skip
PROJECT_PACKAGES = {"stages", "pipeline", "tools", "bench", "tests"}
CHECKED: dict[str, str] = {}  # what the check stage said of a set of inputs ("" when they pass)
FILE_SUFFIXES = (".py", ".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".safetensors", ".html", ".lock", ".toml")


def page_name(page: Path) -> str:
    return str(page.relative_to(PROJECT_ROOT))


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, `$ ` prompts and comments dropped,
    `&&` and `;` lists split."""
    joined = re.sub(r"\\\n", " ", code)
    found = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                if command:
                    found.append(command)
                command = []
            else:
                command.append(word)
    return found


class Reader:
    """Follows one page on a copy of the project and collects what does not hold."""

    def __init__(self, root: Path, page: str) -> None:
        self.root, self.page = root, page
        self.problems: list[str] = []
        self._graph: tuple[str, set[str], list[str]] | None = None

    def problem(self, line: int, text: str) -> None:
        self.problems.append(f"{self.page}:{line}: {text}")

    # --- the graph of the copy, as its params.yaml is now -------------------------------------
    def graph(self) -> tuple[set[str], list[str]]:
        """(stage names, output paths) of dvc.yaml with the copy's current params.yaml."""
        text = (self.root / "params.yaml").read_text()
        if self._graph is None or self._graph[0] != text:
            from dvc.repo import Repo

            with Repo(str(self.root)) as repo:
                stages = repo.index.stages
                names = {stage.name for stage in stages}
                # what stages write: their outputs, and the paths on their command lines (a
                # checkpoint folder, dvclive's folder) that are no declared output
                outs = [out.def_path for stage in stages for out in stage.outs]
                commands = [" ".join(stage.cmd) if isinstance(stage.cmd, list) else stage.cmd or "" for stage in stages]
                outs += [word for command in commands for word in shlex.split(command) if "/" in word]
            self._graph = (text, names, outs)
        return self._graph[1], self._graph[2]

    # --- blocks ------------------------------------------------------------------------------
    def block(self, line: int, language: str, attributes: dict[str, str], code: str) -> None:
        if not language:
            self.problem(line, "a code block without a language (bash, yaml params, text, ...)")
        elif language == "bash":
            for command in commands(code):
                self.command(line, command, follow=True)
        elif "excerpt" in attributes:
            self.excerpt(line, attributes["excerpt"], code)
        elif attributes.keys() & EDITS:
            try:
                apply_edit(self.root, attributes, code)
            except AssertionError as error:
                self.problem(line, f"cannot apply the block: {error}")
        elif "profile" in attributes:
            self.profile_fragment(line, attributes["profile"], code)
        elif "params" in attributes:
            self.params_fragment(line, code, merge="merge" in attributes)
        elif language != "text" and "text" not in attributes:
            self.problem(line, f"a ```{language} block must say what it is: params, excerpt=<path>, file=..., or text")

    def excerpt(self, line: int, path: str, code: str) -> None:
        source = self.root / path
        if not source.is_file():
            self.problem(line, f"excerpt of {path}, which does not exist")
            return
        lines = [text.rstrip() for text in source.read_text().splitlines()]
        at = 0
        for text in filter(str.strip, code.splitlines()):
            try:
                at = lines.index(text.rstrip(), at) + 1
            except ValueError:
                self.problem(line, f"not a line of {path} (after the lines before it): {text.strip()!r}")
                return

    def params_fragment(self, line: int, code: str, merge: bool) -> None:
        """A fragment of params.yaml: merged key by key into the copy's (merge: for good), validated."""
        try:
            fragment = YAML(typ="safe").load(code) or {}
        except Exception as error:  # ruamel raises several unrelated types
            self.problem(line, f"not valid YAML: {error}")
            return
        path = self.root / "params.yaml"
        params = YAML().load(path.read_text())
        merged = _merge(params, fragment)
        try:
            profiles.validate(merged, f"{self.page}:{line} merged into params.yaml")
        except InputError as error:
            self.problem(line, str(error))
            return
        if merge:
            path.write_text(profiles.dump(merged))

    def profile_fragment(self, line: int, name: str, code: str) -> None:
        """Settings shown as a profile's: each value is the one the profile gives (<placeholders> match any)."""
        try:
            given = profiles.profile_params(name, self.root / "params.yaml", self.root)
        except InputError as error:
            self.problem(line, str(error))
            return
        for dotted, value in profiles.leaves(YAML(typ="safe").load(code) or {}).items():
            try:
                actual = lookup(given, dotted)
            except (KeyError, AttributeError, TypeError):
                self.problem(line, f"{dotted}: profile {name} has no such setting")
                continue
            if not (isinstance(value, str) and "<" in value) and value != actual:
                self.problem(line, f"{dotted}: {value!r} here, {actual!r} in profile {name}")

    # --- commands ------------------------------------------------------------------------------
    def command(self, line: int, words: list[str], follow: bool) -> None:
        """Check one command; with follow, do to the copy what it does to the reader's project."""
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before a command
            words = words[1:]
        if not words:
            return
        program, arguments = words[0], words[1:]
        self.paths(line, arguments)
        if program == "make":
            self.make(line, arguments, follow)
        elif program == "dvc":
            self.dvc(line, arguments, follow)
        elif program in ("python", "python3"):
            self.python(line, arguments, follow)
        elif program == "torchrun":
            if "-m" not in arguments:
                self.problem(line, "torchrun without -m <module>")
            else:
                self.module(line, arguments[arguments.index("-m") + 1 :])
        elif program == "git" and follow and arguments[:1] in (["checkout"], ["restore"]):
            result = subprocess.run(["git", *arguments], cwd=self.root, capture_output=True, text=True)
            if result.returncode != 0:
                self.problem(line, f"`git {' '.join(arguments)}` failed: {result.stderr.strip()}")
        elif program not in UNFOLLOWED:
            self.problem(line, f"`{program}`: a command this test does not know (tests/test_docs.py)")

    def paths(self, line: int, arguments: list[str]) -> None:
        """Paths of the project that a command names exist, or dvc.yaml declares them as outputs."""
        for word in arguments:
            word = word.split("=", 1)[-1]
            parts = word.rstrip("/").split("/")
            if "<" in word or len(parts) < 2 or parts[0] not in PROJECT_FOLDERS or word.startswith("data/local/"):
                continue
            if (self.root / word).exists():
                continue
            outs = self.graph()[1]
            if not any(word.rstrip("/") == out or word.startswith(out + "/") for out in outs):
                self.problem(line, f"{word}: no such file in the project, and no stage makes it")

    def make(self, line: int, arguments: list[str], follow: bool) -> None:
        variables = dict(word.split("=", 1) for word in arguments if "=" in word)
        targets = [word for word in arguments if "=" not in word and not word.startswith("-")]
        for name in targets:
            if name not in MAKE_TARGETS:
                self.problem(line, f"`make {name}`: the Makefile has no such target")
        for name in variables.keys() - MAKE_VARIABLES:
            self.problem(line, f"`make ... {name}=`: the Makefile reads no such variable")
        profile = variables.get("PROFILE")
        if profile and not follow and ("<" in profile or "..." in profile):
            return  # a placeholder in the prose
        if profile and not (self.root / "profiles" / f"{profile}.yaml").is_file():
            self.problem(line, f"PROFILE={profile}: no profiles/{profile}.yaml")
            return
        if "run" in targets and profile and follow:
            try:
                profiles.apply(profile, self.root)
            except InputError as error:
                self.problem(line, f"`make run PROFILE={profile}` refuses: {error}")
                return
        if follow and ("check" in targets or "run" in targets):
            self.check(line, profile if "check" in targets else None)

    def check(self, line: int, profile: str | None) -> None:
        """The check stage on the copy (`make check`; `make run` starts with it)."""
        command = [sys.executable, "-m", "stages.check", *(["--profile", profile] if profile else [])]
        inputs = [self.root / name for name in ("params.yaml", "dvc.yaml")]
        inputs += sorted(path for path in (self.root / "data" / "local").rglob("*") if path.is_file())
        key = hashlib.sha256(repr(command).encode())
        for path in inputs:  # the same inputs give the same verdict: pages share it
            key.update(str(path.relative_to(self.root)).encode() + b"\0" + path.read_bytes() + b"\0")
        if key.hexdigest() not in CHECKED:
            result = subprocess.run(command, cwd=self.root, capture_output=True, text=True)
            CHECKED[key.hexdigest()] = "" if result.returncode == 0 else result.stdout + result.stderr
        if CHECKED[key.hexdigest()]:
            self.problem(line, f"the check fails ({' '.join(command[1:])}):\n{CHECKED[key.hexdigest()]}")

    def dvc(self, line: int, arguments: list[str], follow: bool) -> None:
        from dvc.cli import DvcParserError, parse_args

        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
                parsed = parse_args(arguments)
        except (DvcParserError, SystemExit):
            if follow:  # inline code in the prose may name a command without its arguments
                self.problem(line, f"DVC refuses `dvc {' '.join(arguments)}`: {said.getvalue().strip()}")
            return
        if getattr(parsed, "func", None) is None or not hasattr(parsed, "targets"):
            return
        if arguments[:1] in (["repro"], ["exp"], ["experiments"]):
            names = self.graph()[0]
            for target in parsed.targets or []:
                if "<" not in target and target not in names and not (self.root / target).exists():
                    self.problem(line, f"`dvc {' '.join(arguments)}`: no stage {target!r}")
        if getattr(parsed, "set_param", None):
            self.set_params(line, parsed.set_param, queue=parsed.queue, follow=follow)

    def set_params(self, line: int, settings: list[str], queue: bool, follow: bool) -> None:
        """`dvc exp run -S`: each run's settings applied as DVC applies them, then validated. Without
        --queue DVC writes them into the workspace's params.yaml, where they stay."""
        from dvc.utils.cli_parse import to_path_overrides
        from dvc.utils.hydra import apply_overrides, get_hydra_sweeps, to_hydra_overrides

        shown = " ".join(f"-S {setting}" for setting in settings)
        overrides = to_path_overrides(settings)
        try:
            sweep = any(o.is_sweep_override() for o in to_hydra_overrides(overrides.get("params.yaml", [])))
            runs = get_hydra_sweeps(overrides) if sweep and queue else [overrides]
        except Exception as error:  # hydra's parser errors
            self.problem(line, f"DVC cannot parse `{shown}`: {error}")
            return
        if sweep and not queue:
            self.problem(line, f"`{shown}` is a sweep: DVC runs sweeps only with --queue")
        path = self.root / "params.yaml"
        original = path.read_text()
        for run in runs:
            try:
                apply_overrides(path, run.get("params.yaml", []))
                load_params(path)
            except Exception as error:  # DVC's InvalidArgumentError, or the schema's ParamsError
                cause = f" ({error.__cause__})" if error.__cause__ else ""
                self.problem(line, f"`dvc exp run {shown}` fails: {error}{cause}".replace("\n", " "))
                path.write_text(original)
                return
            if queue or not follow:
                path.write_text(original)

    def python(self, line: int, arguments: list[str], follow: bool) -> None:
        if arguments[:1] != ["-m"] or len(arguments) < 2:
            self.problem(line, "python commands in the docs are `python -m <module> ...`")
            return
        module, rest = arguments[1], arguments[2:]
        if module == "pipeline.profiles" and rest[:1] == ["apply"] and follow:
            try:
                profiles.apply(rest[1], self.root)
            except InputError as error:
                self.problem(line, f"`python -m pipeline.profiles apply {rest[1]}` refuses: {error}")
            return
        self.module(line, arguments[1:])

    def module(self, line: int, arguments: list[str]) -> None:
        """A module of the project exists and knows the --flags given to it."""
        module, rest = arguments[0], arguments[1:]
        base = self.root / module.replace(".", "/")
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__main__.py"
        if not source.is_file():
            if module.split(".")[0] in PROJECT_PACKAGES or importlib.util.find_spec(module) is None:
                self.problem(line, f"`-m {module}`: no such module in the project or the environment")
            return  # an installed tool's (pytest): its options are its own
        # the module and the project's modules it imports (a stage's shared options live there)
        text = source.read_text()
        imported = re.findall(r"^from ((?:pipeline|stages)\.\w+) import", text, re.MULTILINE)
        for package, names in re.findall(r"^from (pipeline|stages) import ([\w, ]+)$", text, re.MULTILINE):
            imported += [f"{package}.{name.strip()}" for name in names.split(",")]
        for name in imported:
            path = self.root / (name.replace(".", "/") + ".py")
            text += path.read_text() if path.is_file() else ""
        for flag in (word.split("=", 1)[0] for word in rest if word.startswith("--")):
            if f'"{flag}"' not in text:
                self.problem(line, f"`-m {module}` has no option {flag}")

    # --- inline code in the prose --------------------------------------------------------------
    def prose(self, text: str) -> None:
        for number, line in enumerate(text.splitlines(), 1):
            for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", line):
                if not (PROJECT_ROOT / self.page).parent.joinpath(image).is_file():
                    self.problem(number, f"the image {image} does not exist")
            for span in re.findall(r"`([^`\n]+)`", line):
                if re.match(r"(dvc|make) ", span):
                    try:
                        words = shlex.split(span)
                    except ValueError:
                        continue
                    self.command(number, words, follow=False)
                elif is_setting_name(span) and not setting_exists(span):
                    self.problem(number, f"`{span}`: no such setting in the schema (pipeline/settings/)")


def _merge(base: dict, fragment: dict) -> dict:
    """`fragment` merged into a copy of `base` key by key, as a reader adds keys to params.yaml."""
    merged = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def is_setting_name(span: str) -> bool:
    """Whether inline code reads as a dotted setting name (`sft.seed`), not a file or a module."""
    dotted = re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_<>\-]+)+", span) and not span.endswith(FILE_SUFFIXES)
    return bool(dotted) and span.split(".")[0] in Params.model_fields


def setting_exists(dotted: str) -> bool:
    """Whether `a.b.c` is a key of the settings reference (docs/reference/settings.md, generated
    from the schema): `<name>` there stands for any entry of a collection, `<sft setting>` for any
    setting of `sft`; a collection's entry is a key (`hub.<name>`), and below a mapping of plain
    values (`mixture.weights`) any key goes."""
    return any(pattern.fullmatch(dotted) for pattern in setting_patterns())


@functools.cache
def setting_patterns() -> list[re.Pattern[str]]:
    sft = "|".join(SFTSettings.model_fields)
    patterns = []
    for section in settings_reference.sections():
        for row in section.rows:
            key = re.escape(row.key).replace(re.escape("<name>"), r"[^.]+")
            key = key.replace(re.escape(f"<{OVERRIDES_SECTION} setting>"), f"(?:{sft})")
            if row.type.startswith("mapping"):  # an entry's own keys have rows; a plain value's do not
                key += r"(?:\.[^.]+)?" if row.type.endswith("-> entry") else r"(?:\..+)?"
            patterns.append(re.compile(key))
    return patterns


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_the_page_holds(page: Path, tmp_path: Path):
    """Every block and inline command of the page, followed in order on a copy of the project."""
    root = copy_project(tmp_path / "project")
    commit_all(root)
    reader = Reader(root, page_name(page))
    text = page.read_text()
    for line, language, attributes, code in code_blocks(text):
        reader.block(line, language, attributes, code)
    reader.prose(re.sub(r"^```.*?^```$", lambda m: "\n" * m[0].count("\n"), text, flags=re.MULTILINE | re.DOTALL))
    assert not reader.problems, "\n".join(reader.problems)


def test_every_page_is_reachable_from_the_readme():
    """Links from README.md, then from each page reached, reach every page of docs/."""
    reached, todo = set(), [PROJECT_ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            linked = (page.parent / target).resolve()
            if linked.is_file() and linked.is_relative_to(PROJECT_ROOT):
                todo.append(linked)
    assert not set(PAGES) - reached, f"not linked from README.md or a page it links: {set(PAGES) - reached}"


# The README's failures the issue that brought this test listed (issue 28), as a page: the test must
# keep finding each one.
BROKEN_PAGE = """
Tune one expert: `dvc exp run -S finetune.experts.addition.learning_rate=0.001`.

```json file=data/my_sft/reverse.jsonl
{"messages": [{"role": "user", "content": "Reverse ab"}, {"role": "assistant", "content": "ba"}]}
```

```yaml params merge
finetune:
  experts:
    reverse: {dataset: data/my_sft/reverse.jsonl}
```

```bash
make check
```

```yaml profile=phi3-moe
sft: {adapter: lora}
```

```bash
git checkout params.yaml
dvc exp run -n seed-1 -S sft.seed=1
make run PROFILE=gpu-small
```

The seeds: `sft.seeds`.
"""


def test_the_reader_finds_what_the_readme_got_wrong(tmp_path: Path):
    root = copy_project(tmp_path / "project")
    commit_all(root)
    reader = Reader(root, "page.md")
    for line, language, attributes, code in code_blocks(BROKEN_PAGE):
        reader.block(line, language, attributes, code)
    reader.prose(BROKEN_PAGE)
    found = "\n".join(reader.problems)
    assert "To append to your config use +finetune.experts.addition.learning_rate=0.001" in found
    assert "stage 'mixture' reads but does not depend on in dvc.yaml" in found and "data/local/" in found
    assert "sft.adapter: 'lora' here, 'qlora' in profile phi3-moe" in found
    assert "`make run PROFILE=gpu-small` refuses" in found and "sft.seed = 1 (was 0)" in found
    assert "`sft.seeds`: no such setting" in found
    assert len(reader.problems) == 5, found
