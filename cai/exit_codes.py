"""The exit codes of ``cai`` and ``python -m cai.pipeline``, and the one line an operating-system
error (a full disk, a refused connection, a denied permission) prints in place of a traceback.

    0  done
    1  ``python -m cai.pipeline``: a stage's share of error records passed ``max_error_rate``;
       ``cai``: the command failed on its input (bad arguments, a bad config, data or model)
    2  ``python -m cai.pipeline``: bad input (recipe, sources, arguments)
    3  the operating system refused (disk full, permission denied, connection refused, ...):
       nothing is wrong with the input; fix the cause and run the same command again
"""

from __future__ import annotations

import errno

FAILED_RECORDS = 1
BAD_INPUT = 2
SYSTEM = 3

_ADVICE = {
    errno.ENOSPC: "free space on that disk, or move the run directory to another one (cp -a, "
    "then --run-dir)",
    errno.EDQUOT: "free space within your disk quota, or move the run directory elsewhere",
    errno.EACCES: "check the permissions of that path, or write elsewhere (--run-dir, --out)",
    errno.EROFS: "that file system is read-only: write elsewhere (--run-dir, --out)",
    errno.ECONNREFUSED: "start the server, or fix the address (engine options base_url)",
}
_ADVICE[errno.EPERM] = _ADVICE[errno.EACCES]


def os_error_line(e: OSError) -> str:
    """``error: <what and where>: <reason>. <what to do>, then run the same command again``."""
    if e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        what = f"{where}: {e.strerror or e}"
    else:
        what = str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno)  # type: ignore[arg-type]
    if advice is None and isinstance(e, ConnectionError):
        advice = "check that the server is running at that address"
    advice = advice or f"fix the cause ({type(e).__name__}, errno {e.errno})"
    return (
        f"error: {what}. {advice[0].upper()}{advice[1:]}, then run the command again: a "
        "pipeline run resumes where it stopped."
    )
