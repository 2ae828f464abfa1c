"""Read back what an offline W&B run logged: the records of its ``run-ID.wandb`` file.

The file is W&B's record log (the LevelDB log format: a 7-byte header ``:W&B`` + magic +
version, then 32 KiB blocks of chunks with a 7-byte header: CRC, length, type FULL / FIRST /
MIDDLE / LAST); each record is a ``wandb_internal_pb2.Record`` protobuf. wandb >= 0.20 no
longer ships a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7


def _chunks(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        body = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield body
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            yield pending + body


def records(log: Path) -> list:
    """The protobuf records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(log).read_bytes()
    assert data[:4] == b":W&B", f"{log} is not a W&B record log"
    out = []
    for chunk in _chunks(data):
        record = pb.Record()
        record.ParseFromString(chunk)
        out.append(record)
    return out


class OfflineRun:
    """What an offline run directory (``WANDB_DIR/wandb/offline-run-*``) holds."""

    def __init__(self, directory: Path, timeout: float = 30.0):
        self.dir = Path(directory)
        log = next(self.dir.glob("*.wandb"))
        deadline = time.monotonic() + timeout
        while True:  # the W&B service may still be writing when finish() returns
            self.records = records(log)
            if any(r.WhichOneof("record_type") == "exit" for r in self.records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def name(self) -> str:
        return self.of("run")[0].display_name

    @property
    def config(self) -> dict:
        out = {}
        for rec in self.of("run") + self.of("config"):
            for item in rec.config.update if hasattr(rec, "config") else rec.update:
                out[item.key] = json.loads(item.value_json)
        return out

    @property
    def summary(self) -> dict:
        """The final summary: the last value of each key."""
        out = {}
        for rec in self.of("summary"):
            for item in rec.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
        return out

    def history(self, key: str) -> list:
        rows = []
        for rec in self.of("history"):
            for item in rec.item:
                if (item.key or "/".join(item.nested_key)) == key:
                    rows.append(json.loads(item.value_json))
        return rows

    def table(self, key: str) -> dict:
        """The JSON of the last ``wandb.Table`` logged under ``key`` ({"columns": ..., "data": ...})."""
        files = sorted(self.dir.glob(f"files/media/table/{key}_*.table.json"), key=lambda p: p.stat().st_mtime)
        assert files, f"no table {key!r} in {self.dir}"
        return json.loads(files[-1].read_text())
