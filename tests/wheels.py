"""Wheels built here for pip to serve from a folder (PIP_NO_INDEX + PIP_FIND_LINKS): real pip runs
against them, with no network."""

from __future__ import annotations

import zipfile
from pathlib import Path


def write_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes | str]) -> Path:
    stem = f"{dist.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, payload in files.items():
            wheel.writestr(member, payload)
        wheel.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        wheel.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return path
