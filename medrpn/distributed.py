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
"""

from __future__ import annotations

import os
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
