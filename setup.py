"""Build hooks: ship ``bayeslora-peft-hook.pth`` at the root of site-packages, in wheels and editable installs.

The metadata is in pyproject.toml. The ``.pth`` file imports ``_bayeslora_peft_hook`` at interpreter start,
so that PEFT can load a bayeslora adapter in a process that never imported bayeslora (see that module).
setuptools has no setting for a file at the root of site-packages, hence these two commands:

* ``build_py`` writes the file to the root of the build directory, which a wheel installs into site-packages;
* ``editable_wheel`` (``pip install -e``) builds its wheel, then adds the file and its RECORD line to it.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "bayeslora-peft-hook.pth"
PTH_CONTENT = b"import _bayeslora_peft_hook\n"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, PTH_NAME)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(PTH_CONTENT)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Rewrite ``wheel`` with the file ``name`` at its root (a regular file, mode 644, dated like the wheel's
    other entries) and the matching RECORD line; nothing is done if the wheel already has it."""
    with zipfile.ZipFile(wheel) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    if any(info.filename == name for info, _ in entries):
        return
    added = zipfile.ZipInfo(name, date_time=entries[0][0].date_time)
    added.external_attr = 0o100644 << 16
    added.compress_type = zipfile.ZIP_DEFLATED
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as new:
        new.writestr(added, data)
        for info, content in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + b"\n" + _record_line(name, data).encode() + b"\n"
            new.writestr(info, content)
    rewritten.replace(wheel)


class EditableWheelWithPth(editable_wheel):
    def run(self) -> None:
        super().run()
        wheels = sorted(Path(self.dist_dir).glob("*.editable-*.whl"), key=lambda p: p.stat().st_mtime)
        if not wheels:
            raise RuntimeError(f"no editable wheel in {self.dist_dir} to add {PTH_NAME} to")
        add_to_wheel(wheels[-1], PTH_NAME, PTH_CONTENT)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
