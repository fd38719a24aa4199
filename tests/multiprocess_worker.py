"""Subprocess entry for tests/test_multiprocess.py: one process of a multi-process run.

usage: python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES ROOT
Runs, as this process of the group at 127.0.0.1:PORT, the commands of
``tests/multiprocess_commands.py::commands`` with their outputs relative to the current
folder (so what a process writes lands in its own folder) and inputs under ROOT.
"""

import sys

from convmixer_jax import cli

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from multiprocess_commands import commands  # noqa: E402


def main():
    port, pid, n, root = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    group = [
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        n,
        "--process-id",
        pid,
    ]
    for argv in commands(root, sys.argv[5] if len(sys.argv) > 5 else "two"):
        rc = cli.main(argv + group)
        if rc != 0:
            sys.exit(rc)


if __name__ == "__main__":
    main()
