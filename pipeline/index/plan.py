"""What a crawl must do with each listed model, given what the index already holds.

Skip a model whose revision is indexed; mark a model whose checkpoint files are byte-identical (by the
sha256 its source reports) to an indexed one as a duplicate, without reading weights; hash the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.index.reader import IndexReader
from pipeline.index.schema import STATUS_ERROR, STATUS_OK
from pipeline.refs import ModelRef

ContentKey = tuple[str, ...]
_ORIGINAL_COLUMNS = ["source", "model_id", "spec", "format", "n_params", "code", "parts", "status", "files"]


def content_key(ref: ModelRef) -> ContentKey | None:
    """The sorted digests of a model's checkpoint files: the sha256 the hub or S3 reports, else the ETag
    (a hub reports git object ids for small non-LFS files, such as a sharded checkpoint's index JSON).
    None when a file has neither: such a model is never called a duplicate."""
    digests = [f.sha256 or f.etag for f in ref.files]
    if not digests or not all(digests):
        return None
    return tuple(sorted(d for d in digests if d))


@dataclass
class IndexState:
    """The index as a crawl of one source and spec sees it."""

    revisions: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # model_id -> (rev, status)
    originals: dict[ContentKey, dict[str, Any]] = field(default_factory=dict)  # files -> an ok row

    def unchanged(self, model_id: str, revision: str, retry_errors: bool = False) -> bool:
        """Whether the index holds this revision already (and, with `retry_errors`, holds it as ok)."""
        held = self.revisions.get(model_id)
        return bool(held) and held[0] == revision and not (retry_errors and held[1] == STATUS_ERROR)

    def remember(self, ref: ModelRef, row: dict[str, Any]) -> None:
        """Record a row written by this crawl, so later identical models become duplicates of it."""
        key = content_key(ref)
        if key is not None and row["status"] == STATUS_OK:
            self.originals.setdefault(key, row)


def load_state(index: str, source: str, spec: str) -> IndexState:
    """Revisions of `source` and content keys of every ok row of `spec`, from the committed runs."""
    if not IndexReader.exists(index):
        return IndexState()
    reader = IndexReader(index)
    state = IndexState(revisions=reader.known_revisions(source, spec))
    for row in reader.read_table(_ORIGINAL_COLUMNS).to_pylist():
        if row["spec"] != spec or row["status"] != STATUS_OK or not row["files"]:
            continue
        shas = [f["sha256"] or f["etag"] for f in row["files"]]
        if all(shas):
            state.originals.setdefault(tuple(sorted(shas)), row)
    return state
