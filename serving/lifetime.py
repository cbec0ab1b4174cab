"""Every process of `runbooks up` dies with it, whatever kills it (even `kill -9` of it alone).

The tree: `runbooks up` starts the Prefect server and the alert gateway (subprocess) and the
fork server of serving.warm_start; each flow run is a fork of the fork server. A process group
or a subreaper cannot do this: both need a living `runbooks up` to act. Linux's parent-death
signal (PR_SET_PDEATHSIG) is delivered by the kernel, so each process asks for it itself:

- the server and the gateway, between fork and exec (`die_with_parent` as `preexec_fn`), SIGTERM:
  they shut down cleanly (the server's database, the gateway's WAL);
- the fork server, as its first preload (`serving.fork_server_preload`), SIGKILL: it holds nothing,
  and it must go even though every run keeps it alive (each run holds its "alive" pipe);
- every process forked inside the fork server, right after the fork (`os.register_at_fork`),
  SIGKILL, from its parent: a flow run dies when the fork server dies.

A flow run killed this way keeps the state it had in Prefect (RUNNING, or PAUSED while it waits for
approval), as after a power cut or a `kill -9` of the whole tree. SIGTERM would let Prefect's engine
mark it CRASHED, but with our own server gone too its client retries for about a minute, and the
process would outlive `runbooks up` by that much.

The signal comes when the *thread* that forked the process ends, and is cleared across fork: so
the fork server is started from the main thread (serving.warm_start.enable) and each fork asks for
it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_forking_pid = 0


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def tie_forks_to_parent() -> None:
    """In this process: every later `os.fork` child gets SIGKILL when its parent dies."""
    os.register_at_fork(before=_remember_forking_pid, after_in_child=_die_with_forking_parent)


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_forking_parent() -> None:
    die_with_parent(signal.SIGKILL)
    if os.getppid() != _forking_pid:
        # the parent died between the fork and the prctl: nobody will send the signal now
        os._exit(1)


def stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` writes every thread's stack to this process's stderr (its log).

    For a process that hangs (a Ctrl-C that does not stop it, a stalled server): the tests call
    it on a timeout before they kill the tree, so the log shows where it was stuck.
    """
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
