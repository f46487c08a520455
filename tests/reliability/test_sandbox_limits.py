"""Issue 20, item 2: a sandboxed call stays within its memory and disk, starts from an empty scratch, leaves
nothing behind, and reaches no unix socket of the host.

Each test runs with the protections this machine gives and with the fallbacks (no namespaces: Landlock keeps
writes in the call's folder; no cgroup: a few processes share memory_mb). Code that would fill the host's RAM or
disk if a protection were missing runs only after a probe shows the protection is there, as the fork-bomb test
checks the drop to `nobody` first."""
from __future__ import annotations

import os
import socket
import textwrap
import uuid
from pathlib import Path

import pytest

from posttrain.rewards import run_sandboxed
from posttrain.rewards.sandbox import FileFunction
from tests.reliability.sandboxing import (IS_ROOT, cgroup_works, isolation, landlock_abi,  # noqa: F401
                                          linux_only, memory_bound, namespaces_work, no_strays)

pytestmark = linux_only

MB = 1 << 20


def _protected(folder: str) -> bool:
    """Whether writes to `folder` stay off the host here: it is a tmpfs of at most the scratch size (the
    namespaces' private mount), or writing there is refused (Landlock)."""
    probe = textwrap.dedent(f"""
        import os
        st = os.statvfs({folder!r})
        if st.f_blocks * st.f_frsize > 256 << 20:  # not the private tmpfs: writing must be refused
            path = {folder!r} + "/probe-{uuid.uuid4().hex}"
            try:
                open(path, "w").close()
            except PermissionError:
                pass
            else:
                os.remove(path)
                assert False
    """)
    return run_sandboxed(probe) == (True, None)


@pytest.mark.parametrize("folder", ["/dev/shm", "/tmp", "/var/tmp"])
def test_a_gigabyte_to_scratch_folders_is_stopped_and_leaves_nothing(folder, isolation, no_strays):
    if not os.path.isdir(folder):
        pytest.skip(f"no {folder} here")
    if not _protected(folder):
        if isolation == "plain" and landlock_abi() == 0:
            pytest.skip("without namespaces and Landlock the sandbox cannot keep writes off the host (README)")
        pytest.fail(f"{folder} is not a private tmpfs or refused in the sandbox; not writing a gigabyte there")
    tag = f"posttrain-fill-{uuid.uuid4().hex}"
    code = textwrap.dedent(f"""
        written = 0
        try:
            for i in range(17):  # 17 x 60 MB: a gigabyte, in files under the 64 MB file-size limit
                with open("{folder}/{tag}-%d" % i, "wb") as f:
                    f.write(b"x" * (60 << 20))
                written += 60 << 20
        except OSError:  # no space left (the tmpfs), or no right to write there (Landlock)
            pass
        assert written <= 256 << 20, written  # stopped within the scratch size: half of memory_mb
    """)
    assert run_sandboxed(code, memory_mb=512, timeout_s=20) == (True, None)
    assert not [p for p in os.listdir(folder) if p.startswith(tag)]  # nothing of it on the host


EIGHT_CHILDREN = """
import os, time
r, w = os.pipe()
pids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        try:
            block = b"x" * (400 << 20)  # touched, so resident
            os.write(w, b"1")
            time.sleep(1)
        finally:
            os._exit(0)
    pids.append(pid)
os.close(w)
for pid in pids:
    os.waitpid(pid, 0)
held = 0
while chunk := os.read(r, 16):
    held += len(chunk)
assert held == 8, held  # all eight held their 400 MB: the call used 3.2 GB
"""

BOUND = """
import os, resource
limit = resource.getrlimit(resource.RLIMIT_AS)[0]
nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
def cgroup_limit():
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.strip().split(":", 2)
        for root, name in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max"),
                           ("/sys/fs/cgroup/unified", "memory.max")):
            try:
                text = open(root + path + "/" + name).read().strip()
            except OSError:
                continue
            if text.isdigit() and ("memory" in controllers.split(",") or not controllers):
                return int(text)
    return None
group = cgroup_limit()
assert (group is not None and group <= 600 << 20) or (limit <= 256 << 20 and nproc <= 6), (group, limit, nproc)
"""


def test_forked_children_share_one_memory_limit(memory_bound, no_strays):
    """8 children of 400 MB under memory_mb: 512: the cgroup's OOM killer stops them, or (no cgroup) the
    address space is shared among the few processes allowed, so neither the forks nor the allocations fit."""
    assert run_sandboxed(BOUND, memory_mb=512) == (True, None), "no memory bound in place; not forking 8 x 400 MB"
    value, kind = run_sandboxed(EIGHT_CHILDREN, memory_mb=512, timeout_s=20)
    assert (value, kind) != (True, None)
    assert kind in (None, "memory", "fork_limit", "exception"), kind
    left = [p for p in Path("/sys/fs/cgroup").rglob(f"posttrain-sandbox-{os.getpid()}-*")] if IS_ROOT else []
    assert left == []  # each call's cgroup is removed


def test_every_call_starts_with_an_empty_scratch(isolation, no_strays):
    writes = textwrap.dedent("""
        import os
        names = ["left-behind"] + (["/tmp/a", "/var/tmp/b", "/dev/shm/c"] if os.getcwd() == "/tmp" else [])
        for name in names:
            open(name, "w").write("x")
    """)
    assert run_sandboxed(writes) == (True, None)
    look = "import os\nfor d in ('.', '/tmp', '/var/tmp', '/dev/shm'):\n" \
           "    assert not {'left-behind', 'a', 'b', 'c'} & set(os.listdir(d)), d"
    assert run_sandboxed(look) == (True, None)


SOCKET_CLIENT = '''
def connect(path):
    import socket
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return "connected"
    except OSError as e:
        return type(e).__name__
'''


@pytest.mark.skipif(not IS_ROOT or not os.access("/run", os.W_OK), reason="needs a folder outside /tmp that "
                    "`nobody` can reach (root and /run)")
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the seccomp filter covers x86_64, "
                    "aarch64")
def test_host_unix_sockets_are_out_of_reach(isolation, tmp_path, no_strays):
    """A world-writable unix socket of the host (a network namespace does not cover path sockets)."""
    folder = Path("/run") / f"posttrain-test-{uuid.uuid4().hex}"
    folder.mkdir(mode=0o755)
    client = tmp_path / "client.py"
    client.write_text(SOCKET_CLIENT)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(folder / "s.sock"))
            os.chmod(folder / "s.sock", 0o777)
            server.listen(1)
            value, kind = run_sandboxed(FileFunction(str(client), "connect"), (str(folder / "s.sock"),))
    finally:
        (folder / "s.sock").unlink(missing_ok=True)
        folder.rmdir()
    assert (value, kind) == ("PermissionError", None)  # the socket itself is refused (seccomp)
