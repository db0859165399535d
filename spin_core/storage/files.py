"""Atomic writes: a file in the run directory is either complete or absent; and the run
directory's Parquet files, written atomically and read back only when complete.

Every output is written under a hidden temporary name in its own directory,
flushed to disk, then renamed over the final name; a crash leaves the old file
or none, never half of one. Hidden names are what `tasks/caching.fingerprint`
and the completeness checks skip.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from spin_core.errors import first_line

if TYPE_CHECKING:  # pandas and pyarrow load on first use: `spin status` reads no Parquet
    import pandas as pd
    import pyarrow as pa

logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` when the block ends
    without an error, removed when it raises. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(data: dict, path: str | Path) -> Path:
    return write_text_atomic(json.dumps(data, indent=2, default=float), path)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(df: pd.DataFrame | pa.Table, path: str | Path) -> Path:
    """Write `df` to `path` atomically (`spin_core.storage.files.atomic_path`): a file that exists
    is complete. Parent directories are created."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_checked(
    path: str | Path, *, expected_rows: int | None = None
) -> pd.DataFrame | None:
    """The Parquet file at `path`, or None when it must be redone.

    None when the file is missing, unreadable (e.g. truncated: no valid footer)
    or holds a different number of rows than `expected_rows`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        return None
    try:
        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        if expected_rows is not None and rows != expected_rows:
            logger.warning("%s has %d rows, expected %d; redoing it", path, rows, expected_rows)
            return None
        return parquet.read().to_pandas()
    except (OSError, ValueError, pa.ArrowException) as exc:
        logger.warning("%s is unreadable (%s); redoing it", path, first_line(exc))
        return None


def parquet_rows(path: str | Path) -> int | None:
    """Rows of a complete Parquet file (from its footer), or None if missing or truncated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError, pa.ArrowException):
        return None


def parquet_complete(path: str | Path, expected_rows: int | None = None) -> bool:
    rows = parquet_rows(path)
    return rows is not None and (expected_rows is None or rows == expected_rows)
