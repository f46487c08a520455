"""Issue 20, item 3: a hostile config fails in one line (exit 2) without building what it describes: an alias
bomb (ten nested aliases grew to 5.5 GB, then hung ignoring SIGTERM), a 100 MB file, a recursive alias; and a
SIGTERM while a config is parsed ends the process (exit 143).

The CLI runs in a subprocess under an address-space limit, so a regression fails the test instead of the
machine; its peak RSS is read from wait4."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from posttrain.config import ConfigError, read_yaml
from posttrain.yaml_caps import MAX_CONFIG_BYTES
from tests.conftest import REPO

# Ten levels of ten aliases: 10^10 strings once expanded.
BOMB = "name: bomb\nstages:\n  - kind: sft\n    trainer:\n      extra:\n        a: &a [" + ", ".join(['"lol"'] * 10) \
    + "]\n" + "".join(f"        {x}: &{x} [{', '.join(['*' + p] * 10)}]\n" for p, x in zip("abcdefghi", "bcdefghij"))
ANCHORS = "name: ok\nbase: &base {kind: sft, trainer: {max_steps: 3}}\nstages:\n  - *base\n  - {<<: *base, name: two}\n"


# The CLI is started by a small launcher, not by the test's own process: Linux carries a process's peak RSS
# across exec, so a CLI forked straight from a pytest worker that holds torch and models would report the
# worker's size (seen in CI: 552 MB for a CLI that peaks at ~240 MB).
_LAUNCH = ("import json, os, resource, subprocess, sys\n"
           "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
           "proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
           "_, status, usage = os.wait4(proc.pid, 0)\n"
           "print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024]))\n")


def _cli(*args: str, prelude: str = "") -> tuple[int, str, int]:
    """`posttrain <args>` in a subprocess limited to 8 GB of address space: (exit code, stderr, peak RSS MB)."""
    code = prelude + "import sys\nfrom posttrain.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, sys.executable, "-c", code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, rss_mb = json.loads(proc.stdout)
    return status, proc.stderr, rss_mb


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError, match=r"bomb\.yaml: line \d+: its aliases"):
        read_yaml(path)
    code, err, rss_mb = _cli("run", str(path))
    assert code == 2 and len(_error_lines(err)) == 1 and "aliases" in err, err[-2000:]
    assert rss_mb < 500, rss_mb


def test_a_few_anchors_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(ANCHORS)
    data = read_yaml(path)
    assert data["stages"] == [{"kind": "sft", "trainer": {"max_steps": 3}},
                              {"kind": "sft", "trainer": {"max_steps": 3}, "name": "two"}]


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: loop\nx: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="refers to a value that holds it"):
        read_yaml(path)


def test_hundred_megabyte_config_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "w") as f:
        f.write("name: big\nstages: [{kind: sft}]\nrows:\n" + "  - 1234567890\n" * 1000)
        f.truncate(100 << 20)  # sparse: 100 MB on paper, nothing on disk
    assert path.stat().st_size > MAX_CONFIG_BYTES
    code, err, rss_mb = _cli("run", str(path))
    assert code == 2 and len(_error_lines(err)) == 1 and "over 1 MB" in err and "big.yaml" in err, err[-2000:]
    assert rss_mb < 500, rss_mb


def test_alias_bomb_in_a_set_value_is_refused():
    import posttrain.stages  # noqa: F401  (registers the stage kinds)
    from posttrain.config import stage_pipeline

    bomb = "{" + BOMB.split("extra:\n", 1)[1].replace("\n        ", ", ").strip().rstrip(",") + "}"
    with pytest.raises(ConfigError, match=r"^--set trainer\.extra: line 1: its aliases"):
        stage_pipeline("sft", None, [f"trainer.extra={bomb}"])


def test_sigterm_while_parsing_a_config_exits(tmp_path):
    """SIGTERM arrives while the largest allowed config is being parsed: the process ends (143), it does not
    go on to load anything."""
    path = tmp_path / "wide.yaml"
    path.write_text("name: wide\nstages: [{kind: sft}]\nrows:\n" + "  - 1\n" * 150_000)  # ~0.9 MB
    prelude = ("import os, signal\nimport posttrain.yaml_caps as c\nreal = c._check_expansion\n"
               "def check(*a):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a)\n"
               "c._check_expansion = check\n")
    code, err, _ = _cli("run", str(path), "--run-dir", str(tmp_path / "run"), prelude=prelude)
    assert code == 143 and err.strip().splitlines()[-1] == "terminated", err[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["run", "{f}"], ["stage", "sft", "--config", "{f}"], ["merge", "--from-mergekit={f}"]])
def test_the_command_refuses_a_hostile_file_before_importing_torch(tmp_path, args):
    """The `posttrain` entry point (posttrain.entry) checks the files the command line names before the CLI
    imports torch and the stages: the refusal does not wait for seconds of imports, whatever the machine's load."""
    bomb, big = tmp_path / "bomb.yaml", tmp_path / "big.yaml"
    bomb.write_text(BOMB)
    big.write_bytes(b"name: big\n" + b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    probe = ("import sys\nfrom posttrain.entry import main\nrc = main(sys.argv[1:])\n"
             "print(sorted(m for m in ('torch', 'posttrain.cli', 'posttrain.pipeline') if m in sys.modules))\n"
             "sys.exit(rc)\n")
    for path, says in ((bomb, "aliases"), (big, "over 1 MB")):
        r = subprocess.run([sys.executable, "-c", probe, *[a.format(f=path) for a in args]], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
        assert _error_lines(r.stderr) == [r.stderr.strip()] and says in r.stderr and str(path) in r.stderr
