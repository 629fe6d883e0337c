"""Reads W&B's offline run files (`run-*.wandb`) as the records W&B itself wrote.

    records = read_records(Path("runs/x/wandb/offline-run-.../run-ID.wandb"))
    view = RunView.from_records(records)
    view.history            # one dict per `run.log` call, keys as logged
    view.config, view.summary, view.exit_code

The file is W&B's LevelDB-style log: a 7-byte header (`:W&B`, magic 0xBEE1, version), then
32 KiB blocks of records, each a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST)
and a chunk of one protobuf `wandb_internal_pb2.Record`. wandb 0.31 no longer ships a reader.
A torn tail (the writer was killed mid-block) ends the read; it is not an error.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class NotAWandbFile(ValueError):
    pass


def _payloads(data: bytes) -> list[bytes]:
    if len(data) < HEADER.size:
        raise NotAWandbFile("shorter than W&B's file header")
    ident, magic, _version = HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise NotAWandbFile("no W&B file header")
    out: list[bytes] = []
    pending: list[bytes] | None = None
    pos = HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:
            pos += left_in_block  # block trailer: zero padding
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        chunk = data[start:start + length]
        if kind == 0 and length == 0:
            break  # pre-allocated zeros: nothing more was written
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break  # torn tail
        pos = start + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = [chunk]
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending.append(chunk)
            if kind == LAST:
                out.append(b"".join(pending))
                pending = None
        else:
            break
    return out


def read_records(path: str | Path) -> list[Any]:
    """Every whole `Record` in the file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _value(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except json.JSONDecodeError:
        return value_json


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class RunView:
    """What one offline run file holds, in plain Python."""

    run_id: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def from_records(cls, records: list[Any]) -> "RunView":
        view = cls()
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                view.run_id, view.name = r.run.run_id, r.run.display_name
                for item in r.run.config.update:
                    view.config[_key(item)] = _value(item.value_json)
            elif kind == "config":
                for item in r.config.update:
                    view.config[_key(item)] = _value(item.value_json)
            elif kind == "history":
                view.history.append({_key(i): _value(i.value_json) for i in r.history.item})
            elif kind == "summary":
                for item in r.summary.update:
                    view.summary[_key(item)] = _value(item.value_json)
            elif kind == "artifact":
                view.artifacts.append(r.artifact.name)
            elif kind == "exit":
                view.exit_code = r.exit.exit_code
        return view

    @classmethod
    def read(cls, path: str | Path) -> "RunView":
        return cls.from_records(read_records(path))

    def epochs(self, key: str = "epoch/epoch") -> list[int]:
        """The epochs the run's history holds, once each, in order."""
        return sorted({int(row[key]) for row in self.history if key in row})
