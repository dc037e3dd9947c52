#!/usr/bin/python3
"""safetensors fixture for tests/test_safetensors.c, and a checker for files
sbn writes.

    /usr/bin/python3 tests/data/gen_safetensors.py          # rewrites bn_model.safetensors
    /usr/bin/python3 tests/data/gen_safetensors.py --check FILE [FILE...]

The format (https://github.com/huggingface/safetensors) is written and read by
hand with numpy and json, so neither needs the safetensors package:

    u64 little-endian N | N bytes of JSON header | raw little-endian data

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets relative to the first data byte) and may hold "__metadata__", a
map of strings.  The C tests only read the fixture; they never need Python.

bn_model.safetensors is the state dict of the test's model
    Sequential(BatchNorm(4), SyncBatchNorm(3), BatchNorm(2, affine=False))
with the value of element i of the k-th key of KEYS equal to
(k + 1) + 0.125 * i (exact in float32; test_safetensors.c computes the same).
To exercise the reader it is written unlike sbn's own files: the header lists
the tensors in reverse order, the data is stored in yet another order, the
metadata holds escaped characters, the header is padded with spaces, and
"1.weight" is stored MegEngine-style with shape (1, 3, 1, 1) (BatchNorm loads
any shape with C elements).
"""
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "bn_model.safetensors")

# (key, shape) in sbn_module_state_dict order.
KEYS = [
    ("0.bias", (4,)),
    ("0.running_mean", (4,)),
    ("0.running_var", (4,)),
    ("0.weight", (4,)),
    ("1.bias", (3,)),
    ("1.running_mean", (3,)),
    ("1.running_var", (3,)),
    ("1.weight", (1, 3, 1, 1)),
    ("2.running_mean", (2,)),
    ("2.running_var", (2,)),
]
# The order of the tensors' bytes in the data section (indices into KEYS).
DATA_ORDER = [7, 2, 9, 0, 4, 8, 1, 6, 3, 5]

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def fixture_value(k, shape):
    n = int(np.prod(shape))
    return ((k + 1) + 0.125 * np.arange(n, dtype=np.float64)).astype("<f4").reshape(shape)


def write_fixture(path):
    arrays = {key: fixture_value(k, shape) for k, (key, shape) in enumerate(KEYS)}
    offsets, data, at = {}, b"", 0
    for k in DATA_ORDER:
        key = KEYS[k][0]
        raw = arrays[key].astype("<f4").tobytes()
        offsets[key] = [at, at + len(raw)]
        data += raw
        at += len(raw)
    header = {"__metadata__": {"format": "np",
                               "source": "tests/data/gen_safetensors.py",
                               "note": 'a "quoted" \\ caf\u00e9 \U0001d54a'}}
    for key, shape in reversed(KEYS):
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": offsets[key]}
    text = json.dumps(header, ensure_ascii=True).encode()
    text += b" " * ((-len(text) - 8) % 8 + 8)  # padding, as the format allows
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    print(f"wrote {path}: {len(KEYS)} tensors, {len(text)}-byte header, {len(data)} data bytes")


def check(path):
    """Reads path as the reference implementation would; raises on any flaw."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("shorter than the header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > 100_000_000 or 8 + n > len(blob):
        raise ValueError(f"header length {n} out of range")
    raw = blob[8:8 + n]
    if not raw.startswith(b"{"):
        raise ValueError("header does not begin with '{'")
    header = json.loads(raw.decode("utf-8"))
    meta = header.pop("__metadata__", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("metadata values must be strings")
    data = blob[8 + n:]
    spans = []
    out = {}
    for key, info in header.items():
        if set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{key}: fields {sorted(info)}")
        begin, end = info["data_offsets"]
        size = DTYPE_SIZES[info["dtype"]]
        if end - begin != size * int(np.prod(info["shape"], dtype=np.int64)):
            raise ValueError(f"{key}: shape {info['shape']} does not match {end - begin} bytes")
        spans.append((begin, end, key))
        if info["dtype"] == "F32":
            out[key] = np.frombuffer(data[begin:end], dtype="<f4").reshape(info["shape"])
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise ValueError(f"{key}: data not contiguous at byte {at}")
        at = end
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the last tensor")
    print(f"{path}: ok, metadata {meta}")
    for key, a in out.items():
        print(f"  {key} {list(a.shape)} {a.reshape(-1)[:4].tolist()}")
    return out


def main(argv):
    if len(argv) >= 2 and argv[1] == "--check":
        for path in argv[2:]:
            check(path)
        return 0
    write_fixture(FIXTURE)
    check(FIXTURE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
