"""``python -m tfadam``: usage and command dispatch."""

from tfadam.cli import COMMANDS, main


def test_usage_lists_every_command(capsys) -> None:
    assert main([]) == 2
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)


def test_unknown_command_is_an_error(capsys) -> None:
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_every_command_has_a_main() -> None:
    import importlib

    for module, function, _ in COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), function))
