"""``python -m recsys.distributed.torchrun``: torchrun, with a failed job told in one line.

torchrun (``torch.distributed.run``) answers a worker that exits non-zero with a Python
traceback of its own launcher and a framed failure table, even when every worker has already
printed its one-line error (``recsys.errors``). This module owns launching a stage job: it
takes torchrun's arguments unchanged, runs the job through ``torch.distributed.run``, and on a
worker failure prints one line (``error: recsys.stages.pretrain failed (rank 0 first, exit code
2; failed ranks: 0, 1): each rank's error is above``) and exits with the first failing
worker's exit code, so a preempted stage still exits 143. ``RECSYS_DEBUG=1`` shows
torchrun's own report.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from recsys.errors import debug


def summary(err: ChildFailedError) -> tuple[str, int]:
    """The line that tells a failed job, and the exit code to leave with."""
    rank, first = err.get_first_failure()
    failed = ", ".join(str(r) for r in sorted(err.failures))
    code = first.exitcode if first.exitcode and first.exitcode > 0 else 1
    why = f"exit code {first.exitcode}" if first.exitcode >= 0 else f"signal {-first.exitcode}"
    line = (
        f"error: {err.name} failed (rank {rank} first, {why}; failed ranks: {failed}): "
        "each rank's error is above"
    )
    return line, code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        if debug():
            print(err.format_msg(), file=sys.stderr)
        line, code = summary(err)
        print(line, file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
