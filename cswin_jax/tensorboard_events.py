"""Reads the scalars a training run logged back from its TensorBoard event files.

The files are TFRecord-framed `Event` protos (tensorboardX's); they are parsed here directly,
without TensorFlow or TensorBoard.
"""

from __future__ import annotations

import pathlib
import struct


def _event_files(log_dir: pathlib.Path) -> list[pathlib.Path]:
    if log_dir.is_file():
        return [log_dir]
    for folder in (log_dir / "tensorboard", log_dir):
        files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
        if files:
            return files
    raise FileNotFoundError(
        f"no TensorBoard event files in {log_dir} or {log_dir / 'tensorboard'}; pass a "
        "training workdir (its tensorboard/ folder holds events.out.tfevents.*)"
    )


def _read_events(path: pathlib.Path):
    """Event protos of one TFRecord-framed event file (a truncated last record is dropped:
    the file of a run still writing)."""
    from google.protobuf.message import DecodeError
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            break
        event = event_pb2.Event()
        try:
            event.ParseFromString(data[start:end])
        except DecodeError:
            break
        yield event
        offset = end + 4


def read_scalars(log_dir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a workdir's TensorBoard event files: tag -> [(step, value)] by step.

    log_dir: a training workdir, its tensorboard/ folder, or one event file. Files are read in
    name (= creation time) order, so at a step written twice (a run resumed from an earlier
    checkpoint) the later run's value is kept.
    """
    scalars: dict[str, dict[int, float]] = {}
    for path in _event_files(pathlib.Path(log_dir)):
        for event in _read_events(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor") and value.tensor.float_val:
                    number = float(value.tensor.float_val[0])
                else:
                    continue
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in scalars.items()}
