"""The built wheel installs exactly one top-level import name, `portable_xy`, with the kernel and
backend folders mapped under it and the profile data files included."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_portable_xy_top_level(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("portable_xy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"portable_xy"}
    for required in (
        "portable_xy/__init__.py",
        "portable_xy/triton_kernels/__init__.py",
        "portable_xy/backends/cpu.py",
        "portable_xy/backends/cpu_native.c",  # compiled at first use by cpu_native.py
        "portable_xy/backends/profiles/default.yaml",
        "portable_xy/backends/profiles/cpu.yaml",
    ):
        assert required in names, required
    assert not any(n.startswith(("triton_kernels/", "backends/", "tests/")) for n in names)
    # every package of the source tree is in the wheel (an import that works only from the checkout
    # or an editable install fails here)
    mapped = {"backends": "portable_xy/backends", "triton_kernels": "portable_xy/triton_kernels"}
    for init in [*ROOT.glob("portable_xy/**/__init__.py"), *ROOT.glob("backends/**/__init__.py"),
                 *ROOT.glob("triton_kernels/**/__init__.py")]:  # fmt: skip
        rel = init.relative_to(ROOT).as_posix()
        head, _, rest = rel.partition("/")
        want = f"{mapped.get(head, head)}/{rest}"
        assert want in names, f"{rel} is not packaged (pyproject.toml [tool.setuptools] packages)"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "portable-xy = portable_xy.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
