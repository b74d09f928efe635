"""`dcgrpo` command line: a thin shell over library functions.

Every subcommand takes ``--config FILE``, ``--preset NAME`` and repeated
``--set section.field=value`` overrides, resolved by ``dcgrpo.config`` alone.
Errors a user can fix (bad config, missing file, unreachable server) print one
clear message and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from dcgrpo.config import ConfigError, RunConfig, load_config

log = logging.getLogger("dcgrpo")


class UserError(RuntimeError):
    """A failure caused by input or environment, reported without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (sections as in dcgrpo.config)")
    p.add_argument("--preset", help="tiny-cpu (default), qwen3-8b or qwen3-30b-a3b")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-5 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides, preset=args.preset)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the fully resolved config as YAML (what a run would use)."""
    cfg = config_from_args(args)
    print(f"# preset: {cfg.preset}  hash: {cfg.config_hash()}")
    print(cfg.to_yaml(), end="")
    return 0


# name -> (handler, help, extra-argument adder). Later modules add their
# commands here; each handler is a few lines around one library call.
COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None] | None]
] = {
    "config": (cmd_config, "print the resolved run config", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        if add_args is not None:
            add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.handler(args)
    except (ConfigError, UserError, FileNotFoundError) as exc:
        print(f"dcgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
