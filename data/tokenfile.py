"""The token-file format shared by every dataset: a 1024-byte header of 256 little-endian int32s, then
the tokens as uint16 (GPT-2's 50,257 ids fit).

    header[0] MAGIC        identifies the format
    header[1] VERSION
    header[2] token count  a truncated file is detected by its size
    header[3] vocab size   of the tokenizer that wrote it
    header[4] max token id recorded at write time, checked against the model's vocab on load, and the
               body's own largest id against it (read once per file: cached, body_max_id)
    header[5:9] fingerprint the first 16 bytes of the tokens' SHA-256 (version 2 on): a checkpoint records it,
               and a resume on other data is refused without reading the tokens again

Files are written to a temporary name and renamed, so a crash never leaves a half-written file under
the real name.
"""

import filecmp
import hashlib
import json
import os

import numpy as np

from runtime.errors import UserError
from runtime.files import DiskFullError, cache_dir, write_json

MAGIC = 0x4C574C52  # b"RLWL" read as little-endian int32
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 files have no fingerprint
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


class TokenFileError(UserError):
    """A token file that is missing, of the wrong format, truncated, or unusable for this model."""


class TokenFileWriter:
    """Streams arrays of token ids into path; the header is completed and the file renamed on close, unless
    path already holds exactly these bytes (`unchanged`)."""

    def __init__(self, path: str, vocab_size: int):
        if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 token format")
        self.path, self.vocab_size = path, vocab_size
        self.tmp_path = f"{path}.tmp.{os.getpid()}"
        self.count, self.max_id = 0, -1
        self.digest = hashlib.sha256()
        self.file = open(self.tmp_path, "wb")
        self.file.write(b"\0" * HEADER_BYTES)

    def write(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"{self.path}: token id outside [0, {self.vocab_size})")
        data = tokens.astype(TOKEN_DTYPE).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.count += tokens.size
        self.max_id = max(self.max_id, int(tokens.max()))

    def close(self) -> None:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:5] = (MAGIC, VERSION, self.count, self.vocab_size, self.max_id)
        header[5:9] = np.frombuffer(self.digest.digest()[:16], dtype="<i4")
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        # The same tokens again (a rerun of a prepare): the file stays as it is, its modification time too.
        self.unchanged = os.path.isfile(self.path) and filecmp.cmp(self.tmp_path, self.path, shallow=False)
        if self.unchanged:
            os.remove(self.tmp_path)
        else:
            os.replace(self.tmp_path, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # never leave a partial file behind
            self.file.close()
            os.remove(self.tmp_path)


def split_files(out_dir: str) -> dict[str, int | None]:
    """Each split's token file in out_dir by its modification time (None where there is none): what a
    prepare script compares after writing, to say which files it left as they were."""
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    return {split: os.stat(path).st_mtime_ns if os.path.exists(path) else None for split, path in paths.items()}


def prepared_line(counts: dict[str, int], unit: str, out_dir: str, before: dict[str, int | None]) -> str:
    """A prepare script's last line: each split's count, and the files it left untouched (the same tokens
    again), which keep every cache keyed on them."""
    after = split_files(out_dir)
    kept = [split for split in counts if before.get(split) is not None and before[split] == after.get(split)]
    line = ", ".join(f"{split}: {count:,} {unit}" for split, count in counts.items()) + f" in {out_dir}"
    return line + (f" ({' and '.join(f'{s}.bin' for s in kept)} unchanged: already these tokens)" if kept else "")


def write_tokens(path: str, tokens, vocab_size: int) -> None:
    with TokenFileWriter(path, vocab_size) as writer:
        writer.write(tokens)


def read_header(path: str) -> np.ndarray:
    """A token file's header, its magic and version checked."""
    if not os.path.isfile(path):
        raise TokenFileError(
            f"{path}: no such token file; run its dataset's prepare first (python -m data.<dataset>.prepare)"
        )
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise TokenFileError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version = int(header[0]), int(header[1])
    if magic != MAGIC:
        raise TokenFileError(f"{path}: not a token file (magic {magic:#x}, expected {MAGIC:#x})")
    if version not in READABLE_VERSIONS:
        raise TokenFileError(
            f"{path}: format version {version}, this code reads {VERSION}; run its dataset's prepare again"
        )
    return header


def fingerprint(path: str) -> str | None:
    """What the file holds, in 32 hex digits, from its header alone; None for a version 1 file."""
    header = read_header(path)
    return header[5:9].astype("<i4").tobytes().hex() if int(header[1]) >= 2 else None


SCAN_CHUNK = 1 << 26  # tokens per read of the body scan: 128 MB
_SCANNED: dict[str, tuple[dict, int]] = {}  # this process's scans: path -> (the file's identity, its largest id)


def body_max_id(path: str, count: int, cache_path: str | None = None) -> int:
    """The largest token id the file's body holds. Reading every token takes a while on a large file
    (OpenWebText's 9B tokens are 18 GB: docs/operations.md has the cost), so the answer is kept, keyed by
    the file's path, size, modification time and header: in this process (a run opens each split several
    times), and in cache_path, where a restart reads it back. Each process of a run's first start scans
    once."""
    cache_path = cache_path or os.path.join(cache_dir(), "token-files.json")
    status = os.stat(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    key = os.path.realpath(path)
    identity = {
        "bytes": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "header_sha256": hashlib.sha256(header).hexdigest(),
    }
    remembered = _SCANNED.get(key)
    if remembered is not None and remembered[0] == identity:
        return remembered[1]
    try:
        with open(cache_path) as f:
            entries = json.load(f)
    except (OSError, ValueError):  # no cache yet, or a damaged one: scan
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("max_id"), int):
        if all(entry.get(name) == value for name, value in identity.items()):
            _SCANNED[key] = identity, entry["max_id"]
            return entry["max_id"]
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
    largest = max((int(tokens[i : i + SCAN_CHUNK].max()) for i in range(0, count, SCAN_CHUNK)), default=-1)
    _SCANNED[key] = identity, largest
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        kept = {name: entry for name, entry in entries.items() if os.path.exists(name)}  # files since deleted go
        write_json(cache_path, {**kept, key: {**identity, "max_id": largest}})
    except (OSError, DiskFullError):  # a cache that cannot be written costs a scan next time, never the run
        pass
    return largest


def read_tokens(path: str, vocab_size: int, min_tokens: int = 1) -> np.memmap:
    """Memory-map a token file after validating its header against its size, its body and the model's
    vocabulary."""
    header = read_header(path)
    size = os.path.getsize(path)
    count, file_vocab, max_id = (int(v) for v in header[2:5])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size != expected:
        raise TokenFileError(
            f"{path}: {size} bytes, but its header announces {count} tokens ({expected} bytes): "
            "truncated or not uint16 tokens; run its dataset's prepare again"
        )
    if file_vocab != vocab_size:
        hint = " (a character-level dataset whose vocab.json is missing?)" if file_vocab < vocab_size else ""
        raise TokenFileError(
            f"{path}: written for a vocabulary of {file_vocab} tokens, but the model's has {vocab_size}{hint}; "
            "run its dataset's prepare again, or give the data the model was built for"
        )
    if max_id >= vocab_size:
        raise TokenFileError(
            f"{path}: holds token id {max_id} (tokenizer vocab {file_vocab}), but the model's vocab_size "
            f"is {vocab_size}"
        )
    if count < min_tokens:
        raise TokenFileError(f"{path}: {count} tokens, fewer than the {min_tokens} needed (block_size + 1)")
    body = body_max_id(path, count)
    if body > max_id:
        raise TokenFileError(
            f"{path}: its tokens reach id {body}, past the largest its header records ({max_id}): the file was "
            "altered or damaged after it was written; run its dataset's prepare again"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
