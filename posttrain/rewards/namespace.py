"""Linux namespaces for the reward sandbox: the untrusted code sees no process but its own.

Without root the sandbox keeps the trainer's uid, and Linux lets a process read ``/proc/<pid>/environ`` of any
dumpable process of the same uid, so reward code could read the trainer's ``HF_TOKEN``. A separate uid needs
root; an unprivileged user namespace does not. The sandbox's supervisor (see ``sandbox._CHILD``) calls
``enter_namespaces()``: a new user namespace that maps only its own uid and gid (so the uid, the file access and
RLIMIT_NPROC stay as they were) and a new pid namespace. Its first child is the namespace's init, which only
reaps; the second is the worker, pid 2, which calls ``isolate_worker()``: its own mount namespace with a fresh
``/proc`` that lists the namespace's processes only, private size-limited tmpfs mounts over ``/tmp``,
``/var/tmp`` and ``/dev/shm``, then no capabilities left.

Two layers. The user namespace alone closes the read: ``/proc/<pid>/environ`` needs ptrace read access, and
a process has none over a process of an ancestor user namespace unless it holds CAP_SYS_PTRACE there (the
kernel's commoncap check), same uid or not. The pid namespace and the fresh ``/proc`` hide the rest: the
trainer and the supervisor are not listed, ``getppid()`` is 0, and ``kill(-1, SIGKILL)``, which without them
would kill every process of the trainer's uid (the trainer too), reaches only the code's own processes.

Why the worker is not pid 1 (as in ``unshare --fork --pid``): the kernel drops signals that a namespace's init
sends itself, so ``os.kill(os.getpid(), SIGKILL)`` or RLIMIT_CPU's SIGXCPU would not stop the reward code, and
the supervisor's ``wait4`` would see the init, not the worker (whose status and rusage classify the error).
Why one tmpfs for the three scratch folders: files there are memory that RLIMIT_AS does not count (8 x 60 MB in
``/dev/shm`` passed a 256 MB limit) and, on the host's ``/tmp``, disk that outlived the call; one tmpfs of
``scratch_mb``, shown at three places through bind mounts, caps them together, starts empty on every call and is
freed when the namespace's last process exits (a cgroup, where there is one, also counts its pages).
Why the capabilities go: with CAP_SYS_ADMIN in its namespace the code could unmount the fresh ``/proc`` and
find the host's under it. A nested user namespace gets it nothing: mounts copied into it are locked.

This is source text, not importable code: it is pasted into the child program, which must not import
posttrain (it stays small and quick to start). Uses ctypes: Python 3.11 has no ``os.unshare``, and the
package must not depend on util-linux's ``unshare`` binary.
"""
from __future__ import annotations

import logging

log = logging.getLogger("posttrain.rewards.sandbox")  # the sandbox's own logger: one name to filter on


def log_unavailable(reason: str, uid: int | None, landlock: bool) -> None:
    """Say once, where namespaces fail, what the sandbox runs without; ``uid``: the one it drops to, if any;
    ``landlock``: whether the fallback run was under Landlock, which forbids ptrace access (and so
    ``/proc/<pid>/environ``) to any process outside the sandbox.

    Why run anyway rather than refuse: TRL and axolotl run reward functions in the trainer's own process,
    so their users expect a reward to run wherever the trainer does, and a container that forbids user
    namespaces (Docker's default seccomp profile does) would otherwise lose code rewards altogether. The
    limits, the timeout and the scrubbed environment still hold; only ``/proc`` stays open. As root the drop
    to ``nobody`` already keeps the trainer's environment out of reach, so that case is only logged.
    """
    if uid is not None or landlock:
        who = f"as uid {uid}" if uid is not None else "under Landlock"
        log.info("sandbox: no user/pid namespace (%s); sandboxed code runs %s", reason, who)
        return
    log.warning(
        "sandbox: cannot create a user/pid namespace (%s). Sandboxed reward code runs with this process's "
        "uid and can read its environment through /proc/<pid>/environ (HF_TOKEN, WANDB_API_KEY, ...). "
        "Enable unprivileged user namespaces, run as root, or keep secrets out of this environment.", reason)


# Errors raise OSError; the caller turns any of them into "no namespace" and nothing untrusted runs.
CHILD_CODE = r'''
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000
PR_SET_DUMPABLE = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mount", "unshare", "capset", "prctl"):
        getattr(libc, name).restype = ctypes.c_int
    return ctypes, libc

def _check(ctypes, ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))

def enter_namespaces():
    """Supervisor: new user and pid namespaces with the same uid/gid inside; start their init; return its pid."""
    ctypes, libc = _libc()
    uid, gid = os.geteuid(), os.getegid()
    # After the drop from root the process is not dumpable, so its /proc/self files belong to root and
    # `nobody` could not write uid_map. Dumpable only while we write them.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        _check(ctypes, libc.unshare(CLONE_NEWUSER | CLONE_NEWPID), "unshare(user, pid)")
        # "deny" first: an unprivileged process may write gid_map only once setgroups is denied.
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    finally:
        # Not dumpable (as after the drop from root; new without root): no process of the same uid outside
        # may trace the supervisor, its init or the worker, which all inherit this.
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    pid = os.fork()  # the first child in the new pid namespace is its init
    if pid == 0:
        ns_init()
    return pid

def ns_init():
    # Init of the namespace: orphans of the reward code come here, and SIGCHLD ignored makes the kernel reap
    # them (zombies would count against RLIMIT_NPROC). No fds: the worker must not reach the report pipe
    # through us. Killing init kills every process in the namespace.
    import signal
    os.closerange(0, 1 << 16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        signal.pause()

def isolate_worker(scratch_mb):
    """Worker (pid 2): a private mount namespace with a /proc of the new pid namespace and one tmpfs of
    `scratch_mb` over /tmp, /var/tmp and /dev/shm, a network namespace of its own when the kernel allows one
    (only a loopback, down: model output reaches no host or port), then no capabilities. True when the tmpfs
    is in place."""
    ctypes, libc = _libc()
    _check(ctypes, libc.unshare(CLONE_NEWNS), "unshare(mount)")
    # Best effort: a kernel or seccomp profile that refuses it still gets the /proc isolation above.
    libc.unshare(CLONE_NEWNET)
    _check(ctypes, libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    # Fails (EPERM) where the host's /proc has files mounted over (Docker masks some): the caller falls back.
    _check(ctypes, libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
    tmpfs = _scratch_tmpfs(ctypes, libc, scratch_mb)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    # Two {effective, permitted, inheritable} words (capabilities 0-63), all zero. The uid inside is not 0,
    # and no_new_privs is set, so no execve can give them back.
    data = (ctypes.c_uint32 * 6)()
    _check(ctypes, libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")
    return tmpfs

def _scratch_tmpfs(ctypes, libc, scratch_mb):
    """One tmpfs on /tmp, its folders t, v, s bound over /tmp, /var/tmp and /dev/shm (those that exist). False
    where the kernel refuses the mount (the parent says so once; Landlock then keeps writes in the call's own
    folder)."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", flags, b"size=%dm,mode=0700" % scratch_mb) != 0:
        return False
    for sub in ("t", "v", "s"):
        os.mkdir("/tmp/" + sub, 0o700)
    for sub, target in (("v", "/var/tmp"), ("s", "/dev/shm"), ("t", "/tmp")):  # /tmp last: it hides the others
        if os.path.isdir(target):
            source = ("/tmp/" + sub).encode()
            _check(ctypes, libc.mount(source, target.encode(), None, MS_BIND, None), "bind " + target)
            libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | flags, None)  # best effort
    return True
'''
