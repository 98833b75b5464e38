"""Read a W&B offline run back: the records of its ``run-*.wandb`` file, decoded with wandb's protobufs.

The file is a LevelDB-style log (wandb's own format): a 7-byte header (":W&B", magic, version), then
32 KiB blocks of chunks (crc32, length, type) that join into serialized ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a .wandb file"
    pos, pending, records = 7, b"", []
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # the block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 or pos + CHUNK_HEADER + length > len(data):  # the end, or a chunk still being written
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_offline_run(wandb_dir, timeout: float = 30.0) -> dict:
    """{"name", "project", "config", "history": [{key: value}], "summary": {key: value}} of the one
    offline run under ``wandb_dir``. ``run.finish()`` can return before wandb's writer process has
    flushed the file, so this waits (up to ``timeout`` s) for the run's closing ``exit`` record."""
    (path,) = Path(wandb_dir).glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    records = read_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)
        records = read_records(path)
    out = {"name": None, "project": None, "config": {}, "history": [], "summary": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            out["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            out["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"] |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
    return out


def _key(item) -> str:
    """An item's key: ``key``, or its ``nested_key`` parts ("reward/mean" may come as ["reward", "mean"])."""
    return item.key or "/".join(item.nested_key)
