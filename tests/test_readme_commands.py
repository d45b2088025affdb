"""Every `python -m src.train ...` line in README.md's fenced code blocks composes against conf/train.yaml.

One test case per command, named by the command, so a renamed config group or key in a documented command
fails here rather than in a reader's shell. A sweep (`-m`, `seed=1,2,3`) is checked at its first value."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.utils.compose import compose

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
PREFIX = ("python", "-m", "src.train")


def fenced_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks (any info string), backslash continuations joined."""
    out, fence, pending = [], None, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
            fence = m.group(1) if fence is None else None
            pending = ""
            continue
        if fence is None:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def readme_commands(text: str) -> list[str]:
    return [line.strip() for line in fenced_lines(text) if line.strip().startswith(" ".join(PREFIX) + " ")
            or line.strip() == " ".join(PREFIX)]


def first_value(override: str) -> str:
    """`key=a,b` or `key=range(1,4)` -> the sweep's first value; anything else unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([override])[0]
    if not parsed.is_sweep_override():
        return override
    return f"{parsed.get_key_element()}={next(iter(parsed.sweep_string_iterator()))}"


def to_overrides(command: str) -> tuple[list[str], str]:
    """(overrides, config name) of one README command, as Hydra would receive them from the shell."""
    words = shlex.split(command, comments=True)
    assert tuple(words[:3]) == PREFIX, command
    overrides, config_name, words = [], "train.yaml", iter(words[3:])
    for w in words:
        if w in ("-m", "--multirun"):
            continue
        if w in ("-cn", "--config-name"):
            config_name = next(words)
        elif w.startswith("--config-name="):
            config_name = w.split("=", 1)[1]
        elif w.startswith("-"):
            raise AssertionError(f"{w}: a flag this test does not know how to compose")
        else:
            overrides.append(first_value(w))
    return overrides, config_name if config_name.endswith(".yaml") else f"{config_name}.yaml"


COMMANDS = readme_commands(README.read_text()) if README.is_file() else []


def test_the_parser_on_a_made_up_readme():
    text = ("run it:\n```bash\n. .venv/bin/activate\npython -m src.train experiment=x   # a comment\n"
            "python -m src.eval ckpt_path=y\npython -m src.train -m seed=1,2,3 \\\n    model.loss.alpha=1,2\n```\n"
            "python -m src.train outside=a_fence\n```\npython -m src.train model=softmax\n```\n")
    assert readme_commands(text) == ["python -m src.train experiment=x   # a comment",
                                     "python -m src.train -m seed=1,2,3      model.loss.alpha=1,2",
                                     "python -m src.train model=softmax"]
    assert to_overrides(readme_commands(text)[1]) == (["seed=1", "model.loss.alpha=1"], "train.yaml")
    assert to_overrides("python -m src.train -m 'trainer.max_epochs=range(3,6)' ~logger") == (
        ["trainer.max_epochs=3", "~logger"], "train.yaml")


def test_the_readme_documents_at_least_one_training_command():
    assert COMMANDS, f"no `python -m src.train` line in a fenced code block of {README}"


@pytest.mark.parametrize("command", COMMANDS, ids=[shlex.join(shlex.split(c, comments=True)) for c in COMMANDS])
def test_readme_command_composes(command, tmp_path):
    overrides, config_name = to_overrides(command)
    cfg = compose(overrides, tmp_path / "run", config_name)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves, too


def test_the_readme_stays_a_five_minute_read():
    """Issue #36: at most 30,000 characters; history belongs in docs/decisions.md."""
    assert len(README.read_text()) <= 30_000
