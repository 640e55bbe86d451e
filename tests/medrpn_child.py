"""The body of a `medrpn` command run by `support.run_medrpn`, in a process forked from a server
that has imported medrpn, torch, Lightning and MLflow once (`multiprocessing`'s forkserver).

Executed with `runpy.run_path` in the forked process, with COMMAND set to (argv, cwd, env, stdout
path, stderr path). It sets up what a shell starting `medrpn ARGS` would give a new process (the
working folder, the environment, the command line, multiprocessing's default start method,
standard output and error, here into files), then calls the command's `main` as the `medrpn`
script does; its SystemExit becomes the process's exit status.
"""

import multiprocessing
import os
import sys

argv, cwd, env, stdout_path, stderr_path = COMMAND  # noqa: F821 - given by run_path's init_globals

for fd, path in ((1, stdout_path), (2, stderr_path)):
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(target, fd)  # everything written to fd 1 and 2, Python's streams and libraries' alike
    os.close(target)
os.chdir(cwd)
os.environ.clear()
os.environ.update(env)
sys.argv = ["medrpn", *argv]
# A process started through the forkserver inherits it as its start method; a new `medrpn` process
# has the platform's default (DataLoader workers and the like start with it).
multiprocessing.set_start_method(None, force=True)

from medrpn.cli import main  # noqa: E402 - imported by the server already; after the redirection

main()  # as the `medrpn` script calls it: the command line from sys.argv
