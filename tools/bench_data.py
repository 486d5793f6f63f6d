"""Stage-1 data start-up: prepared (memory-mapped) data against raw files, by corpus size.

Builds JSONL corpora of about 1M and 10M tokens from this Python's standard-library
sources (documents repeated to reach the size), tokenized with the tiny test tokenizer
(``tools/make_tiny_checkpoint.py``); prepares them with ``omnilong.data.prepare`` and
reports its throughput. The ~100M-token prepared corpus is written directly: the 10M
one's token files tiled 10x (tokenizing 100M tokens on the 2-core dev machine would
take minutes and measure the same throughput again).

Then, each case in a fresh subprocess: load the tokenizer, reset the resident-set
high-water mark (``/proc/self/clear_refs``), build the dataset (``prepared_text_dataset``
or ``PackedTextDataset`` on the JSONL), read 4 rows spread over it; report the
construction time, the mean time to read a row, the RSS after reading the rows and the
peak RSS above the baseline (the baseline, about 0.7 GB, is torch and transformers imported).
The child uses one torch thread, as a DataLoader worker does.
The raw path runs at 1M and 10M only (about 150 bytes per token of peak memory).

Usage:
    python tools/bench_data.py [--work-dir /tmp/omnilong-bench-data] [--workers 2]
        [--max-seq-len 131072]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEP = "<|endoftext|>"


def _child(kind: str, tokenizer_dir: str, path: str, max_seq_len: int) -> dict:
    """One start-up in this process: construction time, RSS after 4 rows, peak above baseline."""
    import torch

    from omnilong.data import PackedTextDataset, load_tokenizer, prepared_text_dataset
    from omnilong.metrics import host_peak_memory, reset_host_peak_memory

    torch.set_num_threads(1)  # as in a DataLoader worker; on a loaded machine more threads only wait
    tokenizer = load_tokenizer(tokenizer_dir)
    baseline = reset_host_peak_memory()
    start = time.perf_counter()
    if kind == "prepared":
        dataset = prepared_text_dataset(tokenizer, path, max_seq_len, separator_token=SEP)
    else:
        dataset = PackedTextDataset(tokenizer, path, max_seq_len, separator_token=SEP)
    built = time.perf_counter() - start
    for i in range(4):
        dataset[(len(dataset) - 1) * i // 3]
    row_s = (time.perf_counter() - start - built) / 4
    peak = host_peak_memory()
    rss = reset_host_peak_memory()  # the resident set now
    return {
        "construct_s": built,
        "row_ms": row_s * 1e3,
        "rows": len(dataset),
        "baseline_mb": baseline / 2**20,
        "rss_mb": rss / 2**20,
        "peak_above_mb": (peak - baseline) / 2**20,
    }


def _write_corpus(path: Path, target_tokens: int, chars_per_token: float) -> None:
    """A JSONL of standard-library sources, repeated until about ``target_tokens``."""
    from omnilong.testing import python_stdlib_sources

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_sources()]
    budget = target_tokens * chars_per_token
    with open(path, "w") as f:
        written, i = 0, 0
        while written < budget:
            text = texts[i % len(texts)]
            f.write(json.dumps({"text": text}) + "\n")
            written, i = written + len(text), i + 1


def _chars_per_token(tokenizer_dir: Path) -> float:
    from omnilong.data import load_tokenizer
    from omnilong.testing import python_stdlib_sources

    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in python_stdlib_sources(100)]
    return sum(map(len, texts)) / sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _tile(source: Path, output: Path, times: int) -> dict:
    """A prepared text directory holding ``source``'s documents ``times`` times over."""
    import numpy as np

    from omnilong.data.prepared import PreparedWriter

    meta = json.loads((source / "meta.json").read_text())
    tokens = np.fromfile(source / "tokens.u32", dtype="<u4")
    lengths = np.diff(np.fromfile(source / "offsets.i64", dtype="<i8"))
    writer = PreparedWriter(output, "text")
    for _ in range(times):
        writer.add_stream(tokens, lengths)
    keep = ("settings", "tokenizer_fingerprint", "tokenizer_dir", "sources", "num_skipped")
    writer.commit({**{k: meta[k] for k in keep}, "command": f"tools/bench_data.py: {source} tiled {times}x"})
    return json.loads((output / "meta.json").read_text())


def _run_child(kind: str, tokenizer_dir: Path, path: Path, max_seq_len: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(tokenizer_dir), str(path), str(max_seq_len)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="where corpora go (default: a temporary directory, removed)")
    parser.add_argument("--workers", type=int, default=2, help="prepare processes")
    parser.add_argument("--max-seq-len", type=int, default=131072)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, tokenizer_dir, path, max_seq_len = args.child
        print(json.dumps(_child(kind, tokenizer_dir, path, int(max_seq_len))))
        return

    from omnilong.data.prepare import prepare
    from omnilong.testing.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="omnilong-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tiny_qwen2_5_vl(work / "tiny", seed=0)
    ratio = _chars_per_token(tokenizer_dir)
    prepared, raw = {}, {}
    print(f"prepare (tiny BPE tokenizer, {args.workers} workers, {SEP} separator)")
    print(f"{'tokens':>12} {'documents':>10} {'seconds':>8} {'tokens/s':>10}")
    for label, target in (("1M", 1_000_000), ("10M", 10_000_000)):
        raw[label] = work / f"corpus-{label}.jsonl"
        _write_corpus(raw[label], target, ratio)
        prepared[label] = work / f"prepared-{label}"
        meta = prepare(
            "text",
            raw[label],
            tokenizer_dir,
            prepared[label],
            workers=args.workers,
            separator_token=SEP,
            force=True,
            progress=False,
        )
        print(
            f"{meta['num_tokens']:>12,} {meta['num_documents']:>10,} {meta['prepare_seconds']:>8.1f} "
            f"{meta['num_tokens'] / meta['prepare_seconds']:>10,.0f}"
        )
    prepared["100M"] = work / "prepared-100M"
    meta = _tile(prepared["10M"], prepared["100M"], 10)
    print(f"{meta['num_tokens']:>12,} {meta['num_documents']:>10,}    (10M token files tiled 10x, not tokenized)")

    print(f"\nstart-up of one rank, max_seq_len {args.max_seq_len:,}; fresh process per case; 4 rows read")
    print(
        f"{'corpus':>7} {'path':>9} {'tokens':>12} {'rows':>6} {'construct s':>12} {'ms/row':>7} {'RSS MB':>7} "
        f"{'peak above baseline MB':>23}"
    )
    cases = [(label, "prepared", prepared[label]) for label in ("1M", "10M", "100M")]
    cases += [(label, "raw", raw[label]) for label in ("1M", "10M")]
    for label, kind, path in cases:
        tokens = json.loads(((prepared[label] if kind == "raw" else path) / "meta.json").read_text())["num_tokens"]
        r = _run_child(kind, tokenizer_dir, path, args.max_seq_len)
        print(
            f"{label:>7} {kind:>9} {tokens:>12,} {r['rows']:>6} {r['construct_s']:>12.3f} {r['row_ms']:>7.1f} "
            f"{r['rss_mb']:>7.0f} {r['peak_above_mb']:>23.1f}"
        )
    if args.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
