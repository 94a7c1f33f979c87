"""The command lines: choice flags list what their config dataclasses allow; --help explains every flag.

Each choice is written once, as a Literal type on a config field; argparse reads its
choices from there (minilm.cli.choices) and the config checks a value built in Python
against the same type (minilm.config.check_choices)."""

import pytest

import finetune
import train
from minilm import pretrain
from minilm.cli import main_guard
from minilm.config import choice_fields
from minilm.errors import MinilmError
from minilm.finetune import FinetuneConfig
from minilm.pretrain import PretrainConfig
from minilm.training import LoopConfig


@pytest.mark.parametrize("script, settings", [(train, PretrainConfig), (finetune, FinetuneConfig)],
                         ids=["train.py", "finetune.py"])
def test_each_choice_flag_takes_exactly_the_values_its_config_type_lists(script, settings, capsys):
    fields = {**choice_fields(settings), "schedule": choice_fields(LoopConfig)["schedule"]}
    assert {"dtype", "norm_position", "tokenizer_type", "schedule"} <= set(fields)
    for name, allowed in fields.items():
        flag = "--" + name.replace("_", "-")
        for value in allowed:
            if value is None:           # the flag left out
                continue
            parsed = script.parse_args([flag, value])
            loop = parsed.loop if isinstance(parsed.loop, dict) else vars(parsed.loop)
            assert (loop[name] if name == "schedule" else getattr(parsed, name)) == value, flag
        # a usage error is one line and exit code 2, like every other user error
        assert main_guard(lambda: script.parse_args([flag, "nonsense"])) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: argument {flag}: invalid choice: 'nonsense'") and err.count("\n") == 1


def test_configs_built_in_python_reject_an_unlisted_choice_before_any_work(tmp_path):
    with pytest.raises(MinilmError, match=r"^--objective 'bert'; choose one of clm, mlm, rtd$"):
        pretrain.run(PretrainConfig(out=str(tmp_path / "pretrain"), objective="bert"))
    with pytest.raises(MinilmError, match=r"^--pooling 'avg'; choose one of cls, mean, max, last$"):
        finetune.run(FinetuneConfig(out=str(tmp_path / "finetune"), pooling="avg"))
    with pytest.raises(MinilmError, match=r"^--schedule 'cosin'; choose one of cosine, linear, constant$"):
        LoopConfig(max_steps=1, schedule="cosin")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", [train, finetune], ids=["train.py", "finetune.py"])
def test_help_explains_every_flag_and_shows_real_defaults(script, capsys):
    """Every option has a help line; a default is shown where there is one, and a None default
    ("not given", which the help line explains) is not printed as "(default: None)"."""
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    printed = capsys.readouterr().out
    assert "(default: None)" not in printed and "(default: 0.1)" in printed
    flags = [line.split()[0] for line in printed.splitlines() if line.startswith("  --")]
    assert "--lr" in flags and "--batch-size" in flags
    lines = printed.splitlines()
    for i, line in enumerate(lines):
        # an option's help follows on the same line, or (a long option) indented on the next one
        if line.startswith("  --") and len(line.split()) <= 2:
            assert i + 1 < len(lines) and lines[i + 1].startswith(" " * 20), line
