"""The Arrow schema of index shards (DESIGN.md, Index on disk): one row per model and spec."""

from __future__ import annotations

import pyarrow as pa

CODE_BYTES = 32  # 256-bit model codes

FILE_TYPE = pa.struct(
    [("name", pa.string()), ("size", pa.int64()), ("sha256", pa.string()), ("etag", pa.string())]
)
PART_TYPE = pa.struct([("name", pa.string()), ("code", pa.binary())])

SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("model_id", pa.string()),
        ("revision", pa.string()),
        ("files", pa.list_(FILE_TYPE)),
        ("format", pa.string()),
        ("arch", pa.string()),
        ("license", pa.string()),
        ("declared_base", pa.list_(pa.string())),
        ("n_params", pa.int64()),
        ("spec", pa.string()),
        ("code", pa.binary(CODE_BYTES)),
        ("parts", pa.list_(PART_TYPE)),
        ("bytes_read", pa.int64()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("duplicate_of", pa.string()),
        ("indexed_at", pa.timestamp("us", tz="UTC")),
    ]
)

STATUS_OK = "ok"
STATUS_DUPLICATE = "duplicate"
STATUS_ERROR = "error"
