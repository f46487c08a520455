"""One merge in a fresh process, so that its peak memory is its own:

    python -m benchmarks.merge_worker raw|<method> <out> <shard bytes> <base> <model> [<model> ...]

`raw` is the floor any merge tool pays: read every input tensor once with safetensors and write one output
tensor per name, shard by shard, with no math. safetensors' `get_tensor` (0.8) returns a tensor on its memory
map and reads nothing until the bytes are used: before this was noticed, raw read only the tensor it wrote (a
third of the input bytes; its peak RSS, 1.27 GB, was one model's mapped pages). Each of the other inputs is
now copied into one reused buffer, which is what reading it into memory costs. A method name runs
posttrain's merge stage (`run()` of posttrain/stages/merge.py, unedited) on the same inputs. Prints one JSON line: seconds (after imports),
peak_rss_mb (the kernel's VmHWM: file pages mapped by safetensors count too), peak_anon_mb (anonymous memory,
sampled every 10 ms: what the process allocated itself) and rss_after_imports_mb.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class AnonPeak:
    """Samples RssAnon in a thread; the kernel keeps no high-water mark for anonymous memory alone."""

    def __init__(self) -> None:
        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, _status_mb("RssAnon"))


def raw_merge(out: Path, shard_bytes: int, inputs: list[Path]) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    handles = []
    for folder in inputs:
        files = sorted(folder.glob("*.safetensors"))
        handles.append({n: (f, h) for f in files for h in [safe_open(str(f), "pt")] for n in h.keys()})
    out.mkdir(parents=True)
    shard: dict = {}
    size, count = 0, 0
    scratch = torch.empty(0)
    for name in sorted(handles[0]):
        tensors = [h[name][1].get_tensor(name) for h in handles]  # memory-mapped: nothing read yet
        for other in tensors[:-1]:  # read every input tensor once (the last one is read by save_file)
            data = other.reshape(-1).view(torch.uint8)
            if scratch.numel() < data.numel():
                scratch = torch.empty(data.numel(), dtype=torch.uint8)
            scratch[: data.numel()].copy_(data)
        t = tensors[-1]
        if shard and size + t.numel() * t.element_size() > shard_bytes:
            count += 1
            save_file(shard, str(out / f"model-{count:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * t.element_size()
    save_file(shard, str(out / f"model-{count + 1:05d}.safetensors"), metadata={"format": "pt"})


def stage_merge(method: str, out: Path, shard_bytes: int, inputs: list[Path]) -> None:
    from posttrain.models import resolve_model
    from posttrain.stages.base import StageContext
    from posttrain.stages.merge import MergeStageConfig, run

    cfg = MergeStageConfig(method=method, base=str(inputs[0]), models=[{"model": str(m)} for m in inputs[1:]],
                           max_shard_bytes=shard_bytes)
    out.mkdir(parents=True)
    ctx = StageContext(run_dir=out, work_dir=out, index=1, seed=0, input_model=str(inputs[0]),
                       resolve=lambda r: resolve_model(r, lambda m: None), log=lambda m: None)
    run(cfg, ctx)


def main(argv: list[str]) -> None:
    mode, out, shard_bytes, *inputs = argv
    import torch  # noqa: F401  (imports before the clock: both sides pay them, neither is the merge)

    if mode != "raw":
        import posttrain.stages.merge  # noqa: F401
    after_imports = _status_mb("VmRSS")
    anon = AnonPeak()
    start = time.perf_counter()
    fn = raw_merge if mode == "raw" else lambda *a: stage_merge(mode, *a)
    fn(Path(out), int(shard_bytes), [Path(p) for p in inputs])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _status_mb("VmHWM"), "peak_anon_mb": anon.stop(),
                      "rss_after_imports_mb": after_imports}))


if __name__ == "__main__":
    main(sys.argv[1:])
