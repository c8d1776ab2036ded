"""The one command-line parser of every subcommand: argparse, built from option tables (option_table.py).

argparse rather than fire: it reads a token as text unless the table says otherwise (fire guesses: it
turns `--run-dir 2024` into a number and `--seed 1e3` into a float), it never exits on its own, and its
errors are ours to word, so every bad input stays one line with a HINT and exit status 2. Help texts are
rendered from the tables here too, not by argparse, to keep fastlaunch's layout.

Commands that run a script (the launch, `slurm`, `doctor`) first cut argv at the script with
split_argv: everything after it reaches the script byte for byte, which argparse's REMAINDER does not
promise (it may take a `--` or a script flag that looks like one of ours). argparse then reads only the
flags before the script.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable, Sequence

from ..errors import UsageError
from ..option_table import Option

__all__ = ["HELP_FLAGS", "split_argv", "parse_flags", "wants_help", "option_rows", "value_flags", "switch_flags"]

HELP_FLAGS = ("-h", "--help")


def value_flags(options: Iterable[Option]) -> tuple[str, ...]:
    """The flags that take a value."""
    return tuple(f for o in options if not o.switch for f in o.flags)


def switch_flags(options: Iterable[Option]) -> tuple[str, ...]:
    """The flags that stand alone."""
    return tuple(f for o in options if o.switch for f in o.flags)


def wants_help(tokens: Sequence[str]) -> bool:
    return any(t in HELP_FLAGS for t in tokens)


def split_argv(argv: Sequence[str], value_flags: Sequence[str], bool_flags: Sequence[str], *,
               what: str = "launcher flag", help_command: str = "fastlaunch") -> tuple[list[str], str | None, list[str]]:
    """Split argv at the script path: (flag tokens, script, script args byte for byte)."""
    flags: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # explicit end of the flags: the next token is the script
            return flags, (argv[i + 1] if i + 1 < len(argv) else None), list(argv[i + 2:])
        if not token.startswith("-") or token == "-":
            return flags, token, list(argv[i + 1:])
        name = token.split("=", 1)[0]
        if name in value_flags:
            if "=" in token:
                flags.append(token)
            elif i + 1 < len(argv):
                flags += [token, argv[i + 1]]
                i += 1
            else:
                raise UsageError(f"{what} {name} needs a value", "nothing", f"write {name} VALUE before the script")
        elif token in bool_flags or token in HELP_FLAGS:
            flags.append(token)
        else:
            raise UsageError(f"unknown {what} before the script", token,
                             f"see `{help_command} --help`; flags meant for the script go after the script path")
        i += 1
    return flags, None, []


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str):
        raise UsageError(f"cannot read the flags of {self.prog}", message, f"see `{self.prog} --help`")


def _parser(options: Iterable[Option], prog: str) -> _Parser:
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for option in options:
        if option.switch:
            parser.add_argument(*option.flags, dest=option.name, action="store_true")
        else:
            parser.add_argument(*option.flags, dest=option.name, type=option.parse, metavar=option.metavar)
    return parser


def _joined(tokens: Sequence[str], takes_value: Sequence[str],
            needs_value: Callable[[str], UsageError]) -> list[str]:
    """`--flag value` as `--flag=value`, so that a value starting with a dash stays a value."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in takes_value:
            if i + 1 >= len(tokens):
                raise needs_value(token)
            token = f"{token}={tokens[i + 1]}"
            i += 1
        out.append(token)
        i += 1
    return out


def _launcher_needs_value(flag: str) -> UsageError:
    return UsageError(f"launcher flag {flag} needs a value", "nothing", f"write {flag} VALUE before the script")


def parse_flags(options: Sequence[Option], tokens: Sequence[str], prog: str = "fastlaunch", *,
                needs_value: Callable[[str], UsageError] = _launcher_needs_value) -> tuple[dict[str, Any], list[str]]:
    """The options given in tokens, typed by the table (and only those given); and the tokens that are
    none of them, in order (positionals and unknown flags, for the caller to judge)."""
    joined = _joined(tokens, value_flags(options), needs_value)
    namespace, rest = _parser(options, prog).parse_known_args(joined)
    return vars(namespace), rest


def option_rows(options: Iterable[Option], width: int) -> str:
    """The help's option list: `  FLAG METAVAR` padded to width, then the help; a longer label takes a
    line of its own. Continuation lines of the help are indented under its first line."""
    lines: list[str] = []
    indent = " " * (width + 2)
    for option in options:
        if not option.help:
            continue
        names = ", ".join((*option.aliases, option.flag))
        label = option.label or (f"{names} {option.metavar}" if option.metavar else names)
        first, *more = option.help.split("\n")
        if len(label) <= width - 2:
            lines.append(f"  {label:<{width}}{first}")
        else:
            lines += [f"  {label}", indent + first]
        lines += [indent + line for line in more]
    return "\n".join(lines) + "\n"
