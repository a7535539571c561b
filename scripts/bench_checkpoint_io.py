"""How fast does a checkpoint reach the disk and come back? The kit's verified save and
load side by side with the disk's own limit and with what users would pick instead.

    make bench          # 1 GB state, 3 repeats  -> out/bench/
    make bench-quick    # 100 MB state, 3 repeats, under a minute
    python scripts/bench_checkpoint_io.py --size 500MB --repeats 5 --dir /scratch/me

Every figure is the time of the whole operation, fsync included for saves, and is also
given as a ratio to the raw O_DIRECT write (saves) or read (loads) of the same bytes,
measured in the same run on the same file system: ratios travel between machines better
than GB/s. The page cache is dropped before every load and every save when running as
root (otherwise loads may come from memory, and the report says so).

The state is shaped like a small transformer (embeddings, attention and MLP matrices,
norms), float32, on the CPU.

"kit core" is checkpoint_utils.CheckpointManager, "kit fast" the optional
checkpoint_fast.FastCheckpointManager. Two more tables: how long its ``save_async`` blocks training (the first
call, into cold memory, apart from the later ones), as a fraction of the kit's
synchronous save; and whether an emergency save (the synchronous one) fits in the
``--signal`` lead time, with the largest state that would at the measured rate.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "templates"))
import checkpoint_fast as fast  # noqa: E402
import checkpoint_utils as kit  # noqa: E402
from checkpoint_interval import parse_bytes  # noqa: E402

CHUNK = 64 << 20  # the I/O size of the raw baselines


# ----------------------------------------------------------------------------- the state
def transformer_state(nbytes: int) -> dict[str, torch.Tensor]:
    """Float32 tensors shaped like a transformer's, about ``nbytes`` in all."""
    width = 1024 if nbytes >= 200e6 else 512 if nbytes >= 50e6 else 256
    vocab = 8 * width
    per_layer = 12 * width * width + 4 * width  # qkv, proj, mlp up and down, two norms
    layers = max(1, round((nbytes / 4 - 2 * vocab * width) / per_layer))
    state, generator = {}, torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.rand(*shape, generator=generator)

    state["embed.weight"] = tensor(vocab, width)
    for i in range(layers):
        state[f"layers.{i}.attn.qkv"] = tensor(3 * width, width)
        state[f"layers.{i}.attn.proj"] = tensor(width, width)
        state[f"layers.{i}.mlp.up"] = tensor(4 * width, width)
        state[f"layers.{i}.mlp.down"] = tensor(width, 4 * width)
        for norm in ("norm1", "norm2"):
            state[f"layers.{i}.{norm}.weight"] = tensor(width)
            state[f"layers.{i}.{norm}.bias"] = tensor(width)
    state["head.weight"] = tensor(vocab, width)
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------- raw I/O
def _aligned_buffer() -> mmap.mmap:
    return mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs


def raw_direct_write(state: dict, path: Path, buffer: mmap.mmap) -> None:
    """The tensors' bytes, back to back, through one aligned buffer with O_DIRECT."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        filled = 0
        for tensor in state.values():
            view = memoryview(tensor.numpy()).cast("B")
            while view:
                n = min(len(view), CHUNK - filled)
                buffer[filled:filled + n] = view[:n]
                filled, view = filled + n, view[n:]
                if filled == CHUNK:
                    os.write(fd, buffer)
                    filled = 0
        filled = math.ceil(filled / 4096) * 4096  # padded: O_DIRECT writes whole blocks
        if filled:
            os.write(fd, memoryview(buffer)[:filled])
        os.fsync(fd)
    finally:
        os.close(fd)


def buffered_write(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        for tensor in state.values():
            f.write(memoryview(tensor.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def raw_direct_read(path: Path, buffer: mmap.mmap) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while os.readv(fd, [buffer]) == CHUNK:
            pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the ways
def torch_save_fsync(state: dict, path: Path, crc: bool = True) -> None:
    from torch.utils.serialization import config
    with config.patch({"save.compute_crc32": crc}), open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def safetensors_available() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def safetensors_save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file(state, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder))
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def dcp_load(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder))


def tensors_of(checkpoint: dict) -> dict:
    return {name: value for name, value in checkpoint.items() if torch.is_tensor(value)}


def touch_all(tensors: dict) -> None:
    """Read every byte (an mmap load reads lazily: the time must include the reads)."""
    for tensor in tensors.values():
        tensor.sum()


# ----------------------------------------------------------------------------- harness
def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(operation: Callable[[], None], repeats: int, before: Callable[[], None]) -> list[float]:
    seconds = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        operation()
        seconds.append(time.perf_counter() - started)
    return seconds


def run(size: int, repeats: int, folder: Path, drop: bool = True) -> dict:
    state = transformer_state(size)
    nbytes = state_bytes(state)
    buffer = _aligned_buffer()
    buffer.write(b"\0" * CHUNK)  # pre-touched: the first use must not pay for the pages
    dropped = drop and drop_caches()
    saves, loads = {}, {}
    paths = {name: folder / name for name in
             ("raw.bin", "buffered.bin", "torch.pt", "nocrc.pt", "model.safetensors")}

    def clean() -> None:
        if dropped:
            drop_caches()

    def measure(table: dict, name: str, operation: Callable[[], None]) -> None:
        print(f"  {name} ...", end="", flush=True)
        table[name] = timed(operation, repeats, clean)
        print(f" {min(table[name]):.3f} s", flush=True)

    print(f"state: {len(state)} tensors, {nbytes / 1e6:.0f} MB; folder {folder}; "
          f"page cache {'dropped before each run' if dropped else 'NOT dropped (not root)'}")
    print("saves:")
    measure(saves, "raw O_DIRECT write", lambda: raw_direct_write(state, paths["raw.bin"], buffer))
    measure(saves, "buffered write + fsync", lambda: buffered_write(state, paths["buffered.bin"]))
    measure(saves, "torch.save + fsync", lambda: torch_save_fsync(state, paths["torch.pt"]))
    measure(saves, "torch.save without CRC32 + fsync",
            lambda: torch_save_fsync(state, paths["nocrc.pt"], crc=False))
    if safetensors_available():
        measure(saves, "safetensors + fsync", lambda: safetensors_save(state, paths["model.safetensors"]))
    dcp_folder = folder / "dcp"

    def fresh_dcp_save() -> None:
        shutil.rmtree(dcp_folder, ignore_errors=True)
        dcp_save(state, dcp_folder)
    measure(saves, "DCP save", fresh_dcp_save)
    core = kit.CheckpointManager(folder / "kit-core", keep=1, keep_time=0)
    manager = fast.FastCheckpointManager(folder / "kit", keep=1, keep_time=0)
    step = iter(range(1, 10**6))
    measure(saves, "kit core: verified save", lambda: core.save(state, step=next(step), epoch=0))
    measure(saves, "kit fast: verified save", lambda: manager.save(state, step=next(step), epoch=0))
    signed = type("Sha256Chunks", (fast.FastCheckpointManager,), {"chunk_checksum": "sha256"})
    signed_manager = signed(folder / "kit-sha256", keep=1, keep_time=0)
    measure(saves, "kit fast, sha256 per chunk (signed markers)",
            lambda: signed_manager.save(state, step=next(step), epoch=0))

    print("loads:")
    measure(loads, "raw O_DIRECT read", lambda: raw_direct_read(paths["raw.bin"], buffer))
    measure(loads, "torch.load", lambda: torch.load(paths["torch.pt"], weights_only=True))
    measure(loads, "torch.load mmap=True, every byte read",
            lambda: touch_all(torch.load(paths["torch.pt"], weights_only=True, mmap=True)))
    if safetensors_available():
        from safetensors.torch import load_file
        measure(loads, "safetensors", lambda: load_file(str(paths["model.safetensors"])))
    target = {name: torch.empty_like(t) for name, t in state.items()}
    measure(loads, "DCP load", lambda: dcp_load(target, dcp_folder))
    measure(loads, "kit core: verified load, hash then torch.load",
            lambda: touch_all(tensors_of(core.load_latest())))
    measure(loads, "kit fast: verified load, checked while loading",
            lambda: touch_all(tensors_of(manager.load_latest())))
    measure(loads, "kit fast, sha256 per chunk (signed markers)",
            lambda: touch_all(tensors_of(signed_manager.load_latest())))
    tensor_count = len(state)
    del state, target  # the training bench needs the memory, and the disk space
    shutil.rmtree(folder)
    folder.mkdir()
    async_saves = measure_async_save(nbytes, folder / "training", repeats, clean)
    return {"bytes": nbytes, "tensors": tensor_count, "repeats": repeats, "page_cache_dropped": dropped, "folder": str(folder),
            "saves": saves, "loads": loads, "async_save": async_saves}


class TransformerLike(torch.nn.Module):
    """A model with the bench state's shapes that really trains: an embedding, blocks of a
    mixing matrix (the attention's qkv and projection, without the attention) and an MLP,
    and a head."""

    def __init__(self, width: int, vocab: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm1": torch.nn.LayerNorm(width), "qkv": torch.nn.Linear(width, 3 * width),
            "proj": torch.nn.Linear(width, width), "norm2": torch.nn.LayerNorm(width),
            "up": torch.nn.Linear(width, 4 * width), "down": torch.nn.Linear(4 * width, width),
        }) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).chunk(3, dim=-1)
            x = x + block["proj"](q * k.sigmoid() + v)
            x = x + block["down"](torch.nn.functional.gelu(block["up"](block["norm2"](x))))
        return self.head(x)


def training_setup(nbytes: int, tokens: int = 512):
    """A model, AdamW and a batch whose training state (weights and two moments) is about
    ``nbytes``; the step: ``tokens`` tokens forward and backward, then the AdamW step."""
    width = 1024 if nbytes >= 600e6 else 512 if nbytes >= 100e6 else 256 if nbytes >= 20e6 else 64
    vocab = 8 * width
    per_layer = 12 * width * width
    layers = max(1, round((nbytes / 12 - 2 * vocab * width) / per_layer))
    torch.manual_seed(0)
    model = TransformerLike(width, vocab, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(vocab, (tokens // 64, 64))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(batch).flatten(0, 1), batch.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    return model, optimizer, step, state


STEPS_AFTER = 2  # steps timed after each save_async: the background write spans them


def measure_async_save(nbytes: int, folder: Path, repeats: int,
                       before: Callable[[], None]) -> dict:
    """save_async against real training steps of a model whose state is ``nbytes``: how
    long training was blocked (the call, and the optimizer's step waiting for the copy),
    and how much longer the next STEPS_AFTER steps took than without a save (the
    background write shares the cores). The first call copies into cold memory; the later
    ones reuse the buffers. The page cache is not dropped between steps: that would evict
    the libraries' code and slow the next step down for a reason of its own."""
    model, optimizer, step, state = training_setup(nbytes)
    step()  # AdamW's moments exist from the first step on
    manager = fast.FastCheckpointManager(folder / "async", keep=1, keep_time=0)
    sync = fast.FastCheckpointManager(folder / "sync", keep=1, keep_time=0)
    training_state = state()
    state_nbytes = sum(t.numel() * t.element_size() for t in fast._tensors_in(training_state))
    print(f"  training: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"state {state_nbytes / 1e6:.0f} MB", flush=True)
    counter = iter(range(1, 10**6))
    sync_seconds = timed(lambda: sync.save(state(), step=next(counter), epoch=0), repeats,
                         before)
    plain = timed(lambda: [step() for _ in range(STEPS_AFTER)], repeats + 1, lambda: None)[1:]
    # One cold call, then `repeats` warm ones.
    calls = [save_async_then_train(manager, state, step, optimizer, index + 1)
             for index in range(repeats + 1)]
    print(f"  kit fast: async save, blocked {calls[0]['blocked_s']:.3f} s cold, "
          f"{min(c['blocked_s'] for c in calls[1:]):.3f} s warm", flush=True)
    prepared, prepare_seconds = first_save_after_prepare(
        state, step, optimizer, folder / "prepared")
    return {"state_bytes": state_nbytes, "sync_save_s": sync_seconds, "plain_step_s": plain,
            "cold": calls[0], "warm": calls[1:], "after_prepare": prepared,
            "prepare_s": prepare_seconds}


def save_async_then_train(manager, state: Callable[[], dict], step: Callable[[], None],
                          optimizer, at_step: int) -> dict:
    """One save_async, then STEPS_AFTER training steps: the time training was blocked,
    the call and the steps together, and until the background save was done."""
    started = time.perf_counter()
    pending = manager.save_async(state(), step=at_step, epoch=0, optimizer=optimizer)
    for _ in range(STEPS_AFTER):
        step()
    step_seconds = time.perf_counter() - started
    pending.wait()
    return {"blocked_s": pending.blocked_seconds, "step_s": step_seconds,
            "until_saved_s": time.perf_counter() - started}


def first_save_after_prepare(state: Callable[[], dict], step: Callable[[], None], optimizer,
                             folder: Path) -> tuple[dict, float]:
    """The first save_async of a new manager whose buffers prepare_async_save made ready
    (here it is waited for; in training it runs in the background)."""
    manager = fast.FastCheckpointManager(folder, keep=1, keep_time=0)
    started = time.perf_counter()
    manager.prepare_async_save(state())
    manager.wait_for_saves()
    prepare_seconds = time.perf_counter() - started
    return save_async_then_train(manager, state, step, optimizer, 1), prepare_seconds


# ----------------------------------------------------------------------------- report
def rows(report: dict, kind: str, baseline: str) -> list[dict]:
    best = min(report[kind][baseline])
    return [{"way": name, "min_s": min(times), "median_s": statistics.median(times),
             "gb_per_s": report["bytes"] / min(times) / 1e9, "ratio": best / min(times)}
            for name, times in report[kind].items()]


def async_rows(report: dict) -> tuple[list[dict], float, float]:
    """save_async against the training step: blocked time and the step's slowdown, with
    the synchronous save of the same state and a step without a save."""
    timings = report["async_save"]
    sync, plain = min(timings["sync_save_s"]), statistics.median(timings["plain_step_s"])
    warm = timings["warm"]
    best = min(warm, key=lambda call: call["blocked_s"])
    median = sorted(warm, key=lambda call: call["blocked_s"])[len(warm) // 2]
    return [{"call": "first (cold buffers)", **timings["cold"]},
            {"call": "first after prepare_async_save", **timings["after_prepare"]},
            {"call": "later (warm buffers), best", **best},
            {"call": "later (warm buffers), median", **median}], sync, plain


def emergency_figures(report: dict, lead_seconds: float, spare_seconds: float) -> dict:
    """The synchronous verified save against the --signal lead time."""
    seconds = min(report["saves"]["kit fast: verified save"])
    rate = report["bytes"] / seconds
    return {"save_s": seconds, "rate_gb_s": rate / 1e9, "lead_s": lead_seconds,
            "spare_s": spare_seconds, "fits": seconds + spare_seconds <= lead_seconds,
            "largest_gb": rate * (lead_seconds - spare_seconds) / 1e9}


def markdown(report: dict) -> str:
    lines = [f"State: {report['bytes'] / 1e6:.0f} MB in {report['tensors']} float32 tensors; "
             f"{report['repeats']} repeats; page cache "
             f"{'dropped before each' if report['page_cache_dropped'] else 'not dropped'}.", ""]
    for kind, baseline in (("saves", "raw O_DIRECT write"), ("loads", "raw O_DIRECT read")):
        lines += [f"| {kind[:-1]} | min s | median s | GB/s | x {baseline} |", "|---|---|---|---|---|"]
        for row in rows(report, kind, baseline):
            lines.append(f"| {row['way']} | {row['min_s']:.3f} | {row['median_s']:.3f} | "
                         f"{row['gb_per_s']:.2f} | {row['ratio']:.2f} |")
        lines.append("")
    lines += async_markdown(report) + emergency_markdown(report)
    return "\n".join(lines)


def async_markdown(report: dict) -> list[str]:
    table, sync, plain = async_rows(report)
    timings = report["async_save"]
    lines = [f"Async save of a training state of {timings['state_bytes'] / 1e6:.0f} MB "
             f"(weights and AdamW's moments), against real training steps of that model: "
             f"{STEPS_AFTER} steps take {plain:.3f} s (median), a synchronous save "
             f"{sync:.3f} s.", "",
             f"| async save | training blocked, s | x sync save | the call and {STEPS_AFTER} "
             "steps, s | slowed by, s |", "|---|---|---|---|---|"]
    lines += [f"| {row['call']} | {row['blocked_s']:.3f} | {row['blocked_s'] / sync:.3f} | "
              f"{row['step_s']:.3f} | {row['step_s'] - plain:+.3f} |" for row in table]
    done = min(call["until_saved_s"] for call in timings["warm"])
    return lines + ["", f"The background save was done {done:.3f} s after the call (best "
                        f"of the warm calls); prepare_async_save took "
                        f"{timings['prepare_s']:.3f} s in the background.", ""]


def emergency_markdown(report: dict) -> list[str]:
    row = report["emergency_save"]
    return [f"| emergency save (synchronous) | s | GB/s | fits in {row['lead_s']:g} s with "
            f"{row['spare_s']:g} s to spare? | largest state that fits |",
            "|---|---|---|---|---|",
            f"| {report['bytes'] / 1e6:.0f} MB | {row['save_s']:.3f} | {row['rate_gb_s']:.2f} | "
            f"{'yes' if row['fits'] else 'no'} | {row['largest_gb']:.0f} GB |", ""]


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (kind, baseline) in zip(axes, (("saves", "raw O_DIRECT write"),
                                           ("loads", "raw O_DIRECT read"))):
        table = rows(report, kind, baseline)
        ax.barh([r["way"] for r in table], [r["gb_per_s"] for r in table],
                color=["tab:green" if r["way"].startswith("kit") else "tab:gray" for r in table])
        ax.invert_yaxis()
        ax.set_xlabel("GB/s (best of repeats)")
        ax.set_title(f"{kind}, {report['bytes'] / 1e6:.0f} MB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_bytes, default=parse_bytes("1GB"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=REPO / "out" / "bench",
                   help="where to write (the file system you want to measure)")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench",
                   help="where the report goes (NAME.json, NAME.md, NAME.png)")
    p.add_argument("--name", default="report", help="file name of the report, without suffix")
    p.add_argument("--signal-lead", type=float, default=120.0,
                   help="seconds Slurm's --signal gives before the kill (the templates: 120)")
    p.add_argument("--spare", type=float, default=30.0,
                   help="seconds of the lead kept for the last step and the exit")
    p.add_argument("--keep-page-cache", action="store_true",
                   help="do not drop the page cache (it slows down everything else running)")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.dir) as scratch:
        with contextlib.redirect_stderr(sys.stdout):
            report = run(args.size, args.repeats, Path(scratch), drop=not args.keep_page_cache)
    report["emergency_save"] = emergency_figures(report, args.signal_lead, args.spare)
    written = args.out / args.name
    written.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    written.with_suffix(".md").write_text(table + "\n")
    plot(report, written.with_suffix(".png"))
    print("\n" + table)
    print(f"written: {written}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
