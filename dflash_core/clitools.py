"""Shared pieces of the command-line tools (no heavy imports): one-line errors, the
parser that raises them, argument types, prompt encoding, --device / --dtype checks."""
from __future__ import annotations

import argparse


class CliError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    """Every command's parser: one-line errors (CliError), and every option's default in
    its --help line (options without a description get at least that)."""

    def error(self, message):  # one line, not the usage block
        raise CliError(f"{self.prog}: {message}")

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._HelpAction, argparse._VersionAction))
        if action.option_strings and not flag and action.default is not argparse.SUPPRESS:
            if not action.help:
                action.help = "default: %(default)s"
            elif "%(default)" not in action.help and action.default not in (None, ""):
                action.help += " (default: %(default)s)"
        return action


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_device(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"device {device!r} requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CliError(f"unknown device {device!r}: use cpu or cuda[:N]")


def resolve_dtype_arg(prog: str, name: str, device: str):
    """--dtype -> torch.dtype, a bad name as one CLI line."""
    from .runtime import resolve_dtype
    try:
        return resolve_dtype(name, device)
    except ValueError as e:
        raise CliError(f"{prog}: {e}") from None
