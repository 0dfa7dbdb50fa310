"""Training data: load rows (sources), normalise them (formats), tokenise with label masks
(templates), pack (packing) and cache the result (cache). `prepare_data` ties them together."""
from __future__ import annotations

from qingzhou.data.formats import detect_format, to_messages, to_text
from qingzhou.data.packing import Example, pack_examples
from qingzhou.data.prepare import DataConfig, PreparedData, prepare_data
from qingzhou.data.sources import Record, load_records

__all__ = [
    "DataConfig",
    "Example",
    "PreparedData",
    "Record",
    "detect_format",
    "load_records",
    "pack_examples",
    "prepare_data",
    "to_messages",
    "to_text",
]
