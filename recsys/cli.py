"""The ``recsys`` command: one sub-command per job a user runs by hand.

This module owns argument parsing and dispatch only; each sub-command's work lives in its own
module, imported when the sub-command runs so that ``recsys --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from recsys import __version__


def _doctor(args: argparse.Namespace) -> int:
    from recsys import doctor

    return doctor.main(as_json=args.json, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Generative pretraining for Transformer rankers on TorchRec (GPSD).",
    )
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser(
        "doctor",
        help="check that this host's stack can train (versions, accelerator, a 2-rank job)",
        description="Print the versions of the stack, the accelerator and the distributed "
        "backends, then prove the stack works with a 2-process gloo job that shards a TorchRec "
        "EmbeddingCollection and takes a forward/backward step. Exit code 0 only when every "
        "check passes; each failed check names its cause and the fix.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="limit for the 2-rank job (default: %(default)s)",
    )
    doctor.set_defaults(run=_doctor)

    from recsys.data.cli import add_commands as add_data_commands

    add_data_commands(commands)
    return parser


def _log_to_stderr() -> None:
    """recsys's own INFO logs (counts, progress notes) on stderr; other libraries' stay quiet."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("recsys")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recsys`` console script."""
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
