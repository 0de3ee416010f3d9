"""Finding and reading a converter's raw input: a file, a directory, or inside a zip archive.

This module owns locating the files of a public dataset wherever the user points (the
ratings file itself, its directory, or a ``.zip``/``.whl`` archive that contains it, such as
the ``recbole`` wheel, which ships MovieLens-100K) and naming them in error messages as
``archive!member``.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from recsys.data.schema import DataError


class Source:
    """The files a converter may read, found under one user-given path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or directory")
        self._zip = None
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            self.root = self.path
            self._names = [n for n in self._zip.namelist() if not n.endswith("/")]
        elif self.path.is_dir():
            self.root = self.path
            self._names = sorted(
                str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()
            )
        else:  # one file: it comes first, its neighbours (e.g. the item file) after it
            self.root = self.path.parent
            self._names = [
                self.path.name,
                *sorted(p.name for p in self.root.iterdir() if p.is_file() and p != self.path),
            ]

    def find(self, *patterns: str) -> str | None:
        """The first file whose base name matches one of ``patterns`` (in pattern order). A
        file the user named is the only candidate: it is used when it matches, and a file
        beside it is never read in its place (its neighbours serve only as companions,
        through :meth:`sibling`)."""
        if self._zip is None and self.path.is_file():
            matches = any(fnmatch.fnmatch(self.path.name, p) for p in patterns)
            return self.path.name if matches else None
        for pattern in patterns:
            for name in self._names:
                if fnmatch.fnmatch(Path(name).name, pattern):
                    return name
        return None

    def sibling(self, name: str, base: str) -> str | None:
        """The file called ``base`` in the same folder as ``name``, if any."""
        wanted = str(Path(name).parent / base) if Path(name).parent != Path(".") else base
        return wanted if wanted in self._names else None

    def label(self, name: str) -> str:
        """How errors name the file."""
        return f"{self.path}!{name}" if self._zip is not None else str(self.root / name)

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes, decompressed when its name ends in .gz."""
        data = self._zip.read(name) if self._zip is not None else (self.root / name).read_bytes()
        return gzip.decompress(data) if name.endswith(".gz") else data

    def read_text(self, name: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(name).decode(encoding, errors="replace")

    def read_csv(
        self,
        name: str,
        *,
        delimiter: str,
        names: list[str] | None,
        types: dict[str, pa.DataType],
        skip_header: bool = False,
    ) -> pa.Table:
        """A delimited file as a table, with parse errors naming the file."""
        read = pacsv.ReadOptions(
            column_names=names,
            skip_rows=1 if skip_header else 0,
            autogenerate_column_names=names is None and not skip_header,
        )
        parse = pacsv.ParseOptions(delimiter=delimiter)
        convert = pacsv.ConvertOptions(
            column_types=types, include_columns=list(types) if types else None
        )
        try:
            return pacsv.read_csv(
                io.BytesIO(self.read_bytes(name)),
                read_options=read,
                parse_options=parse,
                convert_options=convert,
            )
        except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
            raise DataError(f"{self.label(name)}: cannot parse: {err}") from None

    def require(self, name: str | None, what: str) -> str:
        if name is None:
            if self._zip is None and self.path.is_file():
                raise DataError(
                    f"{self.path}: its name is not one a {what} has; rename it, or give the "
                    "directory that holds it"
                )
            raise DataError(f"{self.path}: no {what} found here")
        return name
