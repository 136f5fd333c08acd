"""Run a command and append its start and end (CLOCK_MONOTONIC) to a file.

    python -I -S bench/timed.py RECORD_FILE COMMAND [ARG...]

Appends "start <id> <t>" just before starting COMMAND and "end <id> <t>" once it has exited,
where <id> is $KUGETSU_TASK_ID (or "-"). COMMAND inherits stdin, stdout, stderr, the
environment and the working directory; the exit code is passed on (128 + N when COMMAND was
killed by signal N). Standard library only, so it starts quickly with -I -S.
"""

import os
import sys
import time


def main(argv: list) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: timed.py RECORD_FILE COMMAND [ARG...]\n")
        return 2
    record, command = argv[1], argv[2:]
    who = os.environ.get("KUGETSU_TASK_ID", "-")
    started = time.monotonic()
    pid = os.posix_spawnp(command[0], command, os.environ)
    _, status = os.waitpid(pid, 0)
    ended = time.monotonic()
    with open(record, "a") as fh:
        fh.write(f"start {who} {started}\nend {who} {ended}\n")
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
