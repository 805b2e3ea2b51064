"""What checking a token file's body costs: the read of every token that finds its largest id
(data/tokenfile.py, body_max_id), once per version of a file, and the cached answer every later start
reads instead.

    python -m bench.bench_token_scan                  # a 2.1 GB file of random GPT-2 ids in /tmp
    python -m bench.bench_token_scan --gigabytes 8 --folder /data   # on the disk the data lives on

Prints the scan's rate from disk (after asking the kernel to drop its page cache: root only; otherwise
the figure is the page cache's) and from memory, the cached read, and what that makes of OpenWebText's
9.0B-token train.bin (18 GB). The file is removed afterwards.
"""

import argparse
import os
import subprocess
import tempfile
import time

import numpy as np

from data.tokenfile import TokenFileWriter, body_max_id, read_header

OPENWEBTEXT_TRAIN_BYTES = 9_035_582_198 * 2  # nanoGPT's train.bin: 9.0B GPT-2 tokens


def timed_scan(path: str, count: int, cache_folder: str) -> float:
    cache = os.path.join(cache_folder, f"cache-{time.perf_counter_ns()}.json")  # a fresh cache: a full scan
    start = time.perf_counter()
    body_max_id(path, count, cache)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.1, help="size of the file to scan")
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where to write it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="token-scan-") as folder:
        path = os.path.join(folder, "train.bin")
        chunk, rng = 1 << 26, np.random.default_rng(0)
        with TokenFileWriter(path, 50257) as writer:
            for _ in range(max(1, round(args.gigabytes * 1e9 / 2 / chunk))):
                writer.write(rng.integers(0, 50257, chunk, dtype=np.uint16))
        count, size = int(read_header(path)[2]), os.path.getsize(path)
        subprocess.run("sync", check=False)
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            cold_label = "from disk (page cache dropped)"
        except OSError:
            cold_label = "first read (the page cache could not be dropped: not root)"
        cold, warm = timed_scan(path, count, folder), timed_scan(path, count, folder)
        cache = os.path.join(folder, "cached.json")
        body_max_id(path, count, cache)
        start = time.perf_counter()
        body_max_id(path, count, cache)
        cached = time.perf_counter() - start
    print(f"{count / 1e9:.2f}B tokens, {size / 1e9:.2f} GB:")
    for label, seconds in ((cold_label, cold), ("from the page cache", warm)):
        rate = size / seconds
        print(
            f"  {label}: {seconds:.2f} s, {rate / 1e9:.1f} GB/s; OpenWebText's train.bin at this rate: "
            f"{OPENWEBTEXT_TRAIN_BYTES / rate:.1f} s"
        )
    print(f"  cached (every later start): {1000 * cached:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
