"""What the sandbox's worker does to itself before untrusted code runs: resource limits, Landlock, seccomp.

Source text, pasted into the child program (``child.py``), which must not import posttrain. ``confine()`` runs in
every process that will run code the trainer did not write (the worker, and code_exec's tester), after the
namespaces (``namespace.py``) and before the "ready" byte that tells the supervisor untrusted code may now run.

* Resource limits: RLIMIT_NPROC, RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_CORE. RLIMIT_AS binds one process;
  the sum over processes is bound by a cgroup the parent makes where it can (``cgroup.py``); where it cannot, the
  parent keeps RLIMIT_NPROC low and divides the address space among the processes allowed (``sandbox.py``).
* Landlock (Linux 5.13+, unprivileged): writes only under the scratch folders (the private tmpfs mounts, or,
  without a mount namespace, the call's scratch folder) and to ``/dev/null``; with ABI 4+, no TCP bind or
  connect (where the namespaces failed, this is the only network barrier); with ABI 6+, no abstract unix socket
  and no signal to a process outside the sandbox. Landlock also forbids ptrace of any process outside the
  domain, which closes ``/proc/<pid>/environ`` of the trainer where namespaces are forbidden.
* seccomp: ``socket(AF_UNIX, ...)`` and ``io_uring_setup`` fail with EACCES. A network namespace does not cover
  path sockets (``/run/docker.sock``, a database's socket), and Landlock up to ABI 7 has no right for connecting
  to one; refusing the socket itself does (``socketpair``, which reaches nothing outside, still works). io_uring
  is refused because its operations bypass seccomp. x86_64 and aarch64 only; a syscall of another ABI (32-bit
  compat calls) is refused too.

Each step is best effort where the kernel lacks it (old kernel, seccomp profile): the worker reports what it got,
and the parent says once what is missing. Landlock and seccomp filters are inherited by every child and cannot be
removed. We write the syscalls by hand (ctypes, about 60 lines): the Python bindings of libseccomp and of
Landlock (``seccomp``, ``landlock`` on PyPI) are not wheels installable everywhere, and the child must start with
the standard library only.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("posttrain.rewards.sandbox")  # the sandbox's own logger: one name to filter on
_said: set[str] = set()  # what is missing here, said once per process


def say_what_is_missing(got: Any, limits: dict[str, Any], in_namespace: bool) -> None:
    """Log once per process each protection the kernel did not give: ``got`` is what the worker reported
    (``confine``'s "R" line), ``limits`` what the parent set (with or without a cgroup)."""
    if not isinstance(got, dict):
        return
    missing = {
        "cgroup": None if limits["cgroup"] else (
            f"no memory cgroup can be made here: the code may run {limits['nproc']} processes and threads of "
            f"{limits['as_bytes'] >> 20} MB each"),
        "tmpfs": None if got.get("tmpfs") or not in_namespace else "no tmpfs mount: scratch files go to disk",
        "landlock": None if got.get("landlock") else (
            "no Landlock (Linux 5.13+): the code may write wherever its uid may (world-writable folders: "
            "/tmp, /var/tmp, /dev/shm) and, without a network namespace, open TCP connections"),
        "seccomp": None if got.get("seccomp") else (
            "no seccomp filter: the code may connect to unix sockets its uid may write (a network namespace "
            "does not cover them)"),
    }
    for key, text in missing.items():
        if text and key not in _said:  # without a cgroup or a tmpfs a fallback holds: that is only logged
            _said.add(key)
            log.log(logging.INFO if key in ("cgroup", "tmpfs") else logging.WARNING, "sandbox: %s", text)


CHILD_CODE = r'''
LANDLOCK_FS_WRITE = ((1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
                     | (1 << 11) | (1 << 12))  # WRITE_FILE, REMOVE_*, MAKE_*
LANDLOCK_REFER, LANDLOCK_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
LANDLOCK_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP, CONNECT_TCP (ABI 4)
LANDLOCK_SCOPES = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET, SIGNAL (ABI 6)
NR_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self: the same on x86_64 and aarch64
# machine -> (AUDIT_ARCH, __NR_socket, __NR_io_uring_setup, has the x32 ABI)
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425, True), "aarch64": (0xC00000B7, 198, 425, False)}

def set_limits(lim):
    # RLIMIT_NPROC counts every process and thread of the real uid, so it is set after the drop.
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    resource.setrlimit(resource.RLIMIT_AS, (lim["as_bytes"], lim["as_bytes"]))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def landlock(writable):
    """Restrict this process and its children to writing under `writable`; returns the ABI (0: none)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(NR_LANDLOCK[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = LANDLOCK_FS_WRITE | (LANDLOCK_REFER if abi >= 2 else 0) | (LANDLOCK_TRUNCATE if abi >= 3 else 0)
    attr = (ctypes.c_uint64 * 3)(fs, LANDLOCK_NET_TCP if abi >= 4 else 0, LANDLOCK_SCOPES if abi >= 6 else 0)
    size = 8 * (3 if abi >= 6 else 2 if abi >= 4 else 1)
    ruleset = libc.syscall(NR_LANDLOCK[0], ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    file_rights = (1 << 1) | (LANDLOCK_TRUNCATE if abi >= 3 else 0)  # what a rule on a file (not a folder) may allow
    try:
        for path, rights in [(p, fs) for p in writable] + [("/dev/null", file_rights)]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = PathBeneath(rights, fd)
                if libc.syscall(NR_LANDLOCK[1], ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                                ctypes.c_uint32(0)) != 0:
                    return 0
            finally:
                os.close(fd)
        if libc.syscall(NR_LANDLOCK[2], ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0
    finally:
        os.close(ruleset)
    return abi

def deny_unix_sockets():
    """A seccomp filter: socket(AF_UNIX) and io_uring_setup fail with EACCES; True when installed."""
    import ctypes
    arch = SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return False
    audit_arch, nr_socket, nr_io_uring, x32 = arch
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, DENY),  # another ABI: refuse every call
            (LD, 0, 0, 0)]  # the syscall number
    if x32:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, DENY)]
    prog += [(JEQ, 0, 1, nr_io_uring), (RET, 0, 0, DENY),
             (JEQ, 0, 3, nr_socket), (LD, 0, 0, 16),  # args[0], low 32 bits (little-endian)
             (JEQ, 0, 1, 1), (RET, 0, 0, DENY),  # AF_UNIX
             (RET, 0, 0, ALLOW)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_SECCOMP (22), SECCOMP_MODE_FILTER (2); needs no_new_privs, which prctl_flags set.
    return libc.prctl(22, 2, ctypes.byref(Prog(len(prog), filters)), 0, 0) == 0

def confine(job, status_fd, scratch):
    """Namespaces (when asked), Landlock, seccomp and limits, then "R" + what took hold, on `status_fd`.
    False (after "N" and the reason) when the namespaces failed: nothing untrusted may run then."""
    tmpfs = False
    if job["namespace"]:
        try:
            tmpfs = isolate_worker(job["scratch_mb"])
        except Exception as e:  # nothing untrusted ran: tell the supervisor, which tells the parent
            os.write(status_fd, ("N%s: %s" % (type(e).__name__, e)).encode()[:500])
            return False
    if tmpfs:
        os.chdir("/tmp")
        writable = ["/tmp", "/var/tmp", "/dev/shm"]
    else:
        writable = [scratch]
    got = {"tmpfs": tmpfs, "landlock": landlock(writable), "seccomp": deny_unix_sockets()}
    # Written before any untrusted code runs, so the code cannot fake an "N" (and so turn namespaces off).
    os.write(status_fd, b"R" + json.dumps(got).encode() + b"\n")
    set_limits(job["limits"])
    return True
'''
