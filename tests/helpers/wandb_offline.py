"""Read a W&B offline run back: the records of its ``run-*.wandb`` file, decoded with wandb's protobufs.

The file is a LevelDB-style log (wandb's own format): a 7-byte header (":W&B", magic, version), then
32 KiB blocks of chunks (crc32, length, type) that join into serialized ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
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
        if kind == 0:
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


def read_offline_run(wandb_dir) -> dict:
    """{"name", "project", "config", "history": [{key: value}], "summary": {key: value}} of the one
    offline run under ``wandb_dir``."""
    (path,) = Path(wandb_dir).glob("offline-run-*/run-*.wandb")
    out = {"name": None, "project": None, "config": {}, "history": [], "summary": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            out["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            out["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"] |= {i.key: json.loads(i.value_json) for i in record.summary.update if i.key}
    return out
