"""A wall-clock limit on an in-process user reward: a call that hangs raises ``RewardTimeout`` in it.

TRL calls reward functions in the trainer's own thread, so a reward that never returns stops training for good.
A thread of ours watches the call; at the deadline it raises ``RewardTimeout`` in the calling thread with
CPython's ``PyThreadState_SetAsyncExc`` (which takes effect at the next bytecode), and, when the call runs in the
main thread, also sends it SIGURG, whose handler (installed for the call's duration) raises it there: that wakes a
call blocked in a system call (a socket read, a sleep) that the asynchronous exception alone would not.

Why not run the reward in a thread and abandon it: the reward would leave the main thread, where its own
``signal``-based timeouts (math-verify's) work only. Why not SIGALRM: rewards use it themselves. What this cannot
stop: a call stuck inside C code that never returns to Python and never makes a system call (a catastrophic
regular expression); run such a reward with ``sandbox: true``, whose process is killed. Checked first:
``func_timeout`` and ``timeout-decorator`` on PyPI do the same two things (an async exception in a thread, or
SIGALRM), but not both, and not without taking SIGALRM or leaving the reward's thread.
"""
from __future__ import annotations

import ctypes
import signal
import threading
from typing import Any, Callable

_NUDGE = signal.SIGURG  # ignored by default, and used by nothing a reward is likely to run


class RewardTimeout(BaseException):
    """A reward call passed its wall-clock limit. A BaseException, so a reward's ``except Exception`` does not
    swallow it."""


def call_with_deadline(fn: Callable[..., Any], limit_s: float, /, **kwargs: Any) -> Any:
    """``fn(**kwargs)``, or RewardTimeout raised in it once ``limit_s`` seconds have passed."""
    state = {"done": False, "fired": False}
    lock = threading.Lock()
    tid = threading.get_ident()
    in_main = threading.current_thread() is threading.main_thread()

    def expire() -> None:
        with lock:
            if state["done"]:
                return
            state["fired"] = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(RewardTimeout))
            if in_main:
                signal.pthread_kill(tid, _NUDGE)

    def nudged(signum: int, frame: Any) -> None:
        if state["fired"] and not state["done"]:
            raise RewardTimeout()

    old = signal.signal(_NUDGE, nudged) if in_main else None
    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    try:
        timer.start()
        try:
            return fn(**kwargs)
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
            # An exception set just before the call returned must not land in the caller's code.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
    finally:
        if in_main:
            signal.signal(_NUDGE, old)
