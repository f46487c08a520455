"""The sandbox's child program, run as ``python -I -c CHILD`` by ``sandbox.run_sandboxed``.

It must not import posttrain: it stays small and quick to start, and runs as a user that may not read the
checkout. It is this module's text plus the source text of ``namespace.py``, ``confine.py`` and ``harness.py``.

The supervisor (trusted) reads the job from stdin while still root, drops to ``nobody`` (uid/gid 65534) when the
parent is root (RLIMIT_NPROC does not bind root), becomes the subreaper of what it starts, enters the
namespaces, and forks the worker: it leads its own process group, confines itself (``confine.py``) and runs the
untrusted code. At the deadline, or when the process whose exit ends the job exits, the supervisor kills every
group it started plus any process that left them, reaps them all (no zombies left to count against
RLIMIT_NPROC), and reports back as JSON over a pipe no other process holds.

Three modes. ``call``: a function in a file, called with JSON arguments (sandboxed user rewards). ``code``: code
chunks run in one namespace. Both report the worker's result with a nonce that is never handed to the untrusted
code, so ``os._exit(0)`` or a forged line on stdout does not fake a result; code that digs the nonce out of the
interpreter's frames could, so code_exec does not use them. ``tests`` (code_exec): the worker serves the
completion and a second process, the tester, runs the tests and alone writes the verdict (``harness.py``); the
job's tests are read from stdin only after the worker is forked, so they are never in its memory.
"""

CHILD = r'''
import errno, json, os, resource, select, signal, sys, time

def keep_imports_reachable():
    # As `nobody` we may not traverse the interpreter's prefix (e.g. a pyenv under /root, mode 0700), so
    # later imports (ctypes, numpy) would fail. Directory handles opened now, as root, are reachable
    # through /proc/self/fd/N whatever the permissions above them; they grant nothing outside sys.path.
    moved = {}
    for p in list(sys.path):
        try:
            fd = os.open(p, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            continue
        os.set_inheritable(fd, True)
        moved[p] = "/proc/self/fd/%d" % fd
    def move(path):
        for old, new in moved.items():
            if path == old or path.startswith(old + os.sep):
                return new + path[len(old):]
        return path
    sys.path[:] = [move(p) for p in sys.path]
    for mod in list(sys.modules.values()):  # packages imported at startup (encodings, collections)
        if isinstance(getattr(mod, "__path__", None), list):
            mod.__path__[:] = [move(p) for p in mod.__path__]
    sys.path_importer_cache.clear()

def become(uid):
    keep_imports_reachable()
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # as root this sets real, effective and saved uid: there is no way back
    except OSError:
        os._exit(__NO_DROP__)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()) != (uid, uid, uid, uid, []):
        os._exit(__NO_DROP__)

def prctl_flags():
    # PR_SET_CHILD_SUBREAPER (36): orphans of the worker's processes come to us, not to init, so we reap
    # them at once (an init that reaps late, or a trainer that is PID 1, would leave zombies that count
    # against RLIMIT_NPROC). PR_SET_NO_NEW_PRIVS (38): no setuid binary can give the worker back root.
    # PR_SET_DUMPABLE (4) 0: no process of the same uid (the worker, without root) may trace or read the
    # memory of the supervisor or of code_exec's tester, which inherit it.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)
    libc.prctl(38, 1, 0, 0, 0)
    libc.prctl(4, 0, 0, 0, 0)

def kind_of(e):
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, OSError) and e.errno == errno.EAGAIN:  # fork() or clone() over RLIMIT_NPROC
        return "fork_limit"
    if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        return "fork_limit"
    return "exception"

def run(job, sources):
    compiled = [compile(src, name, "exec") for src, name in sources]  # under the limits: compiling can blow up
    if job["mode"] == "code":
        ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        try:
            for code in compiled:  # compiled apart, so one chunk cannot swallow the next in a string
                exec(code, ns)
        except AssertionError:  # a failed test: a wrong answer, not an error of the sandboxed code
            return False
        return True
    import types
    sys.meta_path.insert(0, Siblings(job["modules"]))  # first, as a script's folder comes first on sys.path
    mod = types.ModuleType("posttrain_sandboxed_reward")
    mod.__file__ = job["path"]
    sys.modules[mod.__name__] = mod
    exec(compiled[0], mod.__dict__)
    return getattr(mod, job["func"])(*job["args"], **job["kwargs"])

class Siblings:
    # The modules next to the reward file that it imports, read by the trainer (no sys.path entry: the
    # worker may not be allowed to read that folder, and should see nothing else in it).
    def __init__(self, modules):
        self.modules = modules
    def find_spec(self, name, path=None, target=None):
        if path is None and name in self.modules:
            from importlib.machinery import ModuleSpec
            return ModuleSpec(name, self, origin=self.modules[name][1])
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        source, module.__file__ = self.modules[module.__name__]
        exec(compile(source, module.__file__, "exec"), module.__dict__)

def worker(job, sources, wfd, scratch):
    os.setpgid(0, 0)
    if not confine(job, wfd, scratch):
        os._exit(0)
    me = os.getpid()
    try:
        data = json.dumps({"nonce": job["nonce"], "value": run(job, sources), "error": None}).encode()
    except BaseException as e:
        if os.getpid() != me:
            os._exit(1)  # a forked copy of the untrusted code: only the original process reports
        detail = ("%s: %s" % (type(e).__name__, e))[:500]
        data = json.dumps({"nonce": job["nonce"], "value": None, "error": kind_of(e), "detail": detail}).encode()
    if os.getpid() != me:
        os._exit(0)
    while data:
        data = data[os.write(wfd, data):]
    os._exit(0)

def read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

def collect(fds, pid, deadline):
    """Read every fd in `fds` ({name: fd}) until process `pid` exits or the deadline passes:
    ({name: bytes}, timed_out)."""
    pidfd = os.pidfd_open(pid)
    got = {name: [] for name in fds}
    watch = {fd: name for name, fd in fds.items()}
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return {n: b"".join(c) for n, c in got.items()}, True
        ready = select.select(list(watch) + [pidfd], [], [], left)[0]
        for fd in ready:
            if fd in watch:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del watch[fd]
                elif sum(map(len, got[watch[fd]])) < __MAX_RESULT__:
                    got[watch[fd]].append(chunk)
        if pidfd in ready:
            for fd, name in watch.items():
                os.set_blocking(fd, False)
                try:
                    while chunk := os.read(fd, 65536):
                        got[name].append(chunk)
                except BlockingIOError:
                    pass
            return {n: b"".join(c)[:__MAX_RESULT__] for n, c in got.items()}, False

def wait_exit(pid, timeout):
    pidfd = os.pidfd_open(pid)
    select.select([pidfd], [], [], max(0.0, timeout))
    os.close(pidfd)

def children():
    me = os.getpid()
    try:
        with open("/proc/%d/task/%d/children" % (me, me)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: read every parent pid
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found

def reap_all(groups):
    # Kill the groups we started and everything re-parented to us (strays that left them), until no child
    # is left: as subreaper, we have no descendant once we have no child.
    while True:
        for kill, target in [(os.killpg, g) for g in groups] + [(os.kill, c) for c in children()]:
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return

def start_tests(job, sources, out):
    """code_exec: fork the server (the completion), then read the tests, then fork the tester."""
    sr, sw = os.pipe()  # server -> supervisor: ready byte, the completion's error kind
    req_r, req_w = os.pipe()  # tester -> server
    resp_r, resp_w = os.pipe()  # server -> tester
    wpid = os.fork()
    if wpid == 0:
        for fd in (0, out, sr, req_w, resp_r):
            os.close(fd)
        server(job, sources, sw, req_r, resp_w, os.getcwd())
    for fd in (sw, req_r, resp_w):
        os.close(fd)
    tests = json.loads(sys.stdin.buffer.read())  # only now: the server's memory never held them
    vr, vw = os.pipe()  # tester -> supervisor: ready byte, verdict
    tpid = os.fork()
    if tpid == 0:
        for fd in (0, out, sr, vr):
            os.close(fd)
        tester(job, tests, vw, req_w, resp_r, os.getcwd())
    for fd in (vw, req_w, resp_r):
        os.close(fd)
    return wpid, tpid, {"worker": sr, "tester": vr}

def main():
    size = int(read_exact(0, 10))  # the job, without code_exec's tests, which follow it
    job = json.loads(read_exact(0, size))
    out = job.pop("result_fd")
    if job["mode"] == "call":  # read the user's file while still root: `nobody` may not be allowed to
        with open(job["path"], encoding="utf-8") as f:
            sources = [(f.read(), job["path"])]
    else:
        sources = [(s, "<sandbox-%d>" % i) for i, s in enumerate(job["code"])]
    if job["uid"] is not None:
        become(job["uid"])
    prctl_flags()
    if job["namespace"]:
        try:
            enter_namespaces()
        except Exception as e:
            return report_to(out, {"no_namespace": "%s: %s" % (type(e).__name__, e)})
    deadline = time.monotonic() + job["timeout_s"]
    if job["mode"] == "tests":
        wpid, until, fds = start_tests(job, sources, out)
        groups = [wpid, until]
    else:
        rfd, wfd = os.pipe()
        wpid = until = os.fork()
        if wpid == 0:
            for fd in (0, out, rfd):  # the worker must not be able to write the report
                os.close(fd)
            worker(job, sources, wfd, os.getcwd())
        os.close(wfd)
        fds, groups = {"worker": rfd}, [wpid]
    for g in groups:
        try:
            os.setpgid(g, g)  # also here, so the group exists before we could ever kill it
        except OSError:
            pass
    data, timed_out = collect(fds, until, deadline)
    if b'"peer"' in data.get("tester", b""):  # the tester saw the worker's pipes close: let it finish dying
        wait_exit(wpid, min(1.0, deadline - time.monotonic()))
    exited_first = os.waitid(os.P_PID, wpid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)  # each leader is a zombie at worst, so its group id is still ours
        except OSError:
            pass
    _, status, ru = os.wait4(wpid, 0)
    reap_all(groups)  # in a pid namespace this kills its init too, and with it every process left there
    report = {"status": status, "timed_out": timed_out, "maxrss_kb": ru.ru_maxrss,
              "cpu_s": ru.ru_utime + ru.ru_stime, "exited_first": exited_first}
    for name, raw in data.items():
        if raw[:1] == b"N":
            return report_to(out, {"no_namespace": raw[1:].decode("utf-8", "replace")})
        confined, _, rest = raw[1:].partition(b"\n") if raw[:1] == b"R" else (b"", b"", b"")
        report[name] = rest.decode("utf-8", "replace")
        if name == "worker":
            report["confined"] = confined.decode("utf-8", "replace")
    report["result"] = report.pop("worker")
    report_to(out, report)

def report_to(out, report):
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(out, data):]
    os._exit(0)

__NAMESPACE__
__CONFINE__
__HARNESS__
main()
'''
