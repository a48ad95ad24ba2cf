"""Shared pieces of the command-line tools (no heavy imports): one-line errors, the
parser that raises them, argument types, prompt encoding, --device / --dtype checks."""
from __future__ import annotations

import argparse

from .chat import encode_prompt  # noqa: F401  (the CLI commands encode prompts through it)


KV_CACHE_HELP = ("what the target's KV cache stores: float32, bfloat16 (each K / V value rounded to the "
                 "nearest bf16 as it is written: half the bytes a step reads from the cache, the same "
                 "rounding in every mode), or auto (the model's dtype; bf16 where the attention reads "
                 "K / V rounded to bf16 anyway: AMX attention, --amx-inputs bf16)")


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


def _value_list(text: str, flag: str, prog: str, convert, valid, what: str) -> list:
    """Comma-separated values (empty items skipped; "" -> []), each `convert`ed and `valid`,
    or a one-line CliError naming the command, the option and what it takes (`what`)."""
    try:
        vals = [convert(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{prog}: {flag} takes comma-separated {what}, got {text!r}") from None
    if not all(valid(v) for v in vals):
        raise CliError(f"{prog}: {flag} takes {what}, got {text!r}")
    return vals


def int_list(text: str, flag: str, prog: str) -> list[int]:
    """A comma-separated list of positive integers (empty items skipped; "" -> []), or a
    one-line CliError naming the command and the option."""
    return _value_list(text, flag, prog, int, lambda v: v >= 1, "positive integers")


def threshold_list(text: str, flag: str, prog: str) -> list[float]:
    """A comma-separated list of numbers in [0, 1) (empty items skipped; "" -> []), or a
    one-line CliError naming the command and the option."""
    return _value_list(text, flag, prog, float, lambda v: 0.0 <= v < 1.0, "numbers in [0, 1)")


def _check_device(device: str) -> None:
    import torch
    if not (device == "cpu" or device.startswith("cuda")):
        raise CliError(f"unknown device {device!r}: use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"device {device!r} requested but CUDA is not available")


def resolve_dtype_arg(prog: str, name: str, device: str):
    """--dtype -> torch.dtype, a bad name as one CLI line."""
    from .runtime import resolve_dtype
    try:
        return resolve_dtype(name, device)
    except ValueError as e:
        raise CliError(f"{prog}: {e}") from None


CORPUS_HELP = ("greedy draft trees with lookup branches are planned with a corpus index of the target's own "
               "responses (dflash_core/corpus.py; EngineConfig.draft_corpus): auto (the drafter folder's corpus.npz "
               "where it has one), none, or an index file (dflash corpus); greedy output is the same")
TARGET_HELP = "default | HF folder | .gguf | hub id | tiny-random"
DRAFTER_HELP = "default | drafter folder | random"
DRAFTER_WEIGHTS_HELP = ("stored: as the drafter folder holds them; q8_0: rounded onto the native kernel's 8-bit "
                        "grid at load (fp32 only; drafts change a little, the output never); auto: q8_0 where the "
                        "native kernel runs an fp32 drafter, else stored")
DTYPE_HELP = ("auto | float32 | bfloat16 (auto: bf16 on GPUs; on CPUs fp32 where the native kernels build, "
              "else bf16 on AMX/AVX512-BF16)")


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_runtime_args(ap: argparse.ArgumentParser, *, target: str | None = "default", drafter: str | None = None,
                     device: str = "cpu", dtype: str | None = "auto") -> None:
    """The flags every engine command shares: --target [--drafter] --device [--dtype] --threads."""
    if target is not None:
        ap.add_argument("--target", default=target, help=TARGET_HELP)
    if drafter is not None:
        ap.add_argument("--drafter", default=drafter, help=DRAFTER_HELP)
        ap.add_argument("--drafter-weights", choices=("auto", "stored", "q8_0"), default="auto",
                        help=DRAFTER_WEIGHTS_HELP)
    ap.add_argument("--device", default=device, help="cpu | cuda[:N]")
    if dtype is not None:
        ap.add_argument("--dtype", default=dtype, help=DTYPE_HELP)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--no-native", action="store_true",
                    help="fp32 on CPU: plain torch linears instead of the native kernel (dflash_core.native)")
    ap.add_argument("--amx-inputs", choices=("fp32", "bf16"), default="bf16",
                    help="on CPUs with AMX-BF16: what the native kernel's 4-bit / 8-bit AMX linears take, "
                         "bf16 (the default: each input rounded to bf16 first, faster verify blocks and "
                         "prefills, and the attention on AMX tiles too, with bf16 q, k, p, v; the same rounding "
                         "in every mode) or fp32 (exact: the fp32 model)")
    ap.add_argument("--amx-attention", choices=("on", "off"), default="on",
                    help="with --amx-inputs bf16 on AMX: the native layers' attention on AMX tiles too (bf16 q, k, "
                         "p, v, fp32 sums; the default) or in fp32 (off)")
    from .runtime import KV_CACHE_DTYPES
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_HELP)


def apply_runtime_args(prog: str, args: argparse.Namespace):
    """Check --device, set --threads, resolve --dtype (when the parser has it) -> torch.dtype
    or None, and check --drafter-weights against it; bad values raise CliError (one line)."""
    _check_device(args.device)
    if getattr(args, "no_native", False):
        from . import native
        native.set_enabled(False)
    if getattr(args, "amx_inputs", None) is not None:
        from . import native
        native.set_amx_inputs(args.amx_inputs)
    if getattr(args, "amx_attention", None) is not None:
        from . import native
        native.set_amx_attention(args.amx_attention == "on")
    if args.threads < 0:
        raise CliError(f"{prog}: --threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype_arg(prog, args.dtype, args.device) if hasattr(args, "dtype") else None
    if getattr(args, "drafter_weights", None) is not None and dtype is not None:
        from .api import resolve_drafter_weights
        try:
            resolve_drafter_weights(args.drafter_weights, args.device, dtype)
        except ValueError as e:
            raise CliError(f"{prog}: --drafter-weights: {e}") from None
    return dtype


def run_command(prog: str, body, argv) -> int:
    """Run a command's body(argv) with the shared error contract: bad input (CliError:
    commands turn their argument ValueErrors into it) -> one line on stderr, exit 2; a
    model or data that does not load (ModelLoadError, FileNotFoundError) -> one line,
    exit 1."""
    import sys

    from .models.loader import ModelLoadError
    try:
        return body(argv)
    except CliError as e:
        msg = str(e)
        print(msg if msg.startswith(prog) else f"{prog}: {msg}", file=sys.stderr)
        return 2
    except (ModelLoadError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
