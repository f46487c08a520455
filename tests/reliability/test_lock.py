"""Item 5: two processes on one run dir. The second fails at once, naming the pid of the process that holds
the lock, and touches nothing; a holder killed with `kill -9` leaves no stale lock behind (flock dies with it)."""
import os
import signal
import subprocess
import sys
import time

from posttrain.rundir import RunDir
from tests.conftest import REPO
from tests.reliability.conftest import error_lines, sft_args

HOLD = ("import sys, time; from posttrain.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
        "print('locked', flush=True); time.sleep(300)")


def test_second_process_fails_at_once_naming_the_holder(tmp_path, cli):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run_dir.iterdir())
        start = time.monotonic()
        r = cli(*sft_args(run_dir))
        took = time.monotonic() - start
        assert r.returncode == 1, r.stderr[-2000:]
        errors = error_lines(r.stderr)
        assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and str(run_dir) in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        assert took < 60, f"the refusal took {took:.1f}s"  # a hang guard: a run that waited would wait forever
        assert sorted(p.name for p in run_dir.iterdir()) == before == ["LOCK"]  # nothing written
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    rd = RunDir(run_dir)
    rd.lock()  # the lock of a process killed with -9 is free again
    rd.unlock()
