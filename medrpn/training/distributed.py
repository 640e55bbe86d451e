"""What the `medrpn` command does so that a distributed run never hangs when one process dies.

- A rank whose peer died sees its next collective fail (gloo: "Connection closed by peer"; NCCL:
  an aborted communicator or a timeout). `lost_peer` recognises those errors so that the command
  can say in one line what happened and how to resume, instead of a traceback per rank.
- A process started by a launcher (Lightning's own DDP launcher starts ranks 1..N-1 as children
  of rank 0; torchrun starts every rank as a child of its agent) can be left alone if its parent
  is killed outright (SIGKILL, out-of-memory killer): it then waits for a rendezvous or a
  collective that never comes, for as long as the DDP timeout. `watch_launcher` ends such an
  orphan within seconds. A command started from a shell is never watched: closing the terminal
  of a `nohup medrpn fit &` must not stop it.
- The other way round, rank 0 must notice when a rank it launched dies. Lightning's own observer
  polls every 5 s and then SIGKILLs rank 0 without a word, which races with rank 0 seeing the
  lost peer itself: the user got either a clear error or a bare "killed" depending on timing.
  `watch_children` puts medrpn's observer in its place, so the outcome is always one message
  naming the rank and how it ended, the other ranks stopped, and exit code 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted", "Timed out")
ORPHAN_EXIT_CODE = 70


def lost_peer(error: RuntimeError) -> bool:
    """Whether an error is a distributed collective failing because another rank is gone."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (dist.is_initialized() and any(m in str(error) for m in _PEER_LOST))


def rank() -> int:
    """This process's global rank (0 outside distributed runs)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def watch_launcher(poll_s: float = 1.0) -> None:
    """When this process was started by a DDP launcher (it has LOCAL_RANK), exits it soon after
    the launcher dies, with a message; otherwise does nothing."""
    if "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(
            f"medrpn: error: a training process stopped: the process that launched rank {rank()} (pid {parent}) "
            "is gone, so this rank stops too. Restart the command with --ckpt_path last to go on.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="medrpn-launcher-watch", daemon=True).start()


CHILD_DIED_EXIT_CODE = 2  # what a medrpn error exits with


def describe_exit(returncode: int) -> str:
    """A process's return code in words ("killed by SIGKILL (often the out-of-memory killer)")."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (often the out-of-memory killer)" if -returncode == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


def observe_children(children: list[subprocess.Popen], poll_s: float = 0.5) -> None:
    """Stops this process (rank 0) and every other child soon after one child fails, with a message.

    Runs in a daemon thread; returns once every child has ended cleanly."""

    def watch() -> None:
        while True:
            codes = [child.poll() for child in children]
            if all(code == 0 for code in codes):
                return
            failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                break
            time.sleep(poll_s)
        print(
            f"medrpn: error: a training process stopped: rank {failed + 1} (pid {children[failed].pid}) "
            f"{describe_exit(codes[failed])}, so every rank stops. See its log above; restart the same "
            "command with --ckpt_path last to go on from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        for child in children:
            if child.poll() is None:
                child.kill()
        os._exit(CHILD_DIED_EXIT_CODE)

    threading.Thread(target=watch, name="medrpn-children-watch", daemon=True).start()


def watch_children() -> None:
    """Makes Lightning's DDP launcher hand the ranks it starts to `observe_children` instead of
    its own observer (private API, see pyproject.toml's Lightning pin)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._launch_process_observer = observe_children  # the name the Trainer's launcher calls
