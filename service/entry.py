"""The installed `dflash` command: the core's commands (dflash_core/cli.py) plus `serve`
(service/cli.py). It sits on top of both layers, so the core never imports the server."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        # the server's processes share the cores: sleeping OpenMP waiters (before torch loads)
        from dflash_core.runtime import set_thread_policy
        set_thread_policy(shared=True)
        from dflash_core.clitools import CliError
        from .cli import main as serve_main
        try:
            return serve_main(argv[1:])
        except CliError as e:
            print(str(e), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dflash: interrupted", file=sys.stderr)
            return 130
    from dflash_core.cli import main as core_main
    return core_main(argv)


if __name__ == "__main__":
    sys.exit(main())
