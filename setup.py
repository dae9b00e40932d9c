"""Build hook: generate the gRPC/protobuf stubs (asyncopd.v1) from protos/ into every wheel.

The stubs are build outputs, never committed (.gitignore); `make proto` writes them into the
source tree for development. A wheel or sdist-built install (`pip install .`, `pip install
git+URL`, `pip wheel`) gets them from this hook, which runs grpc_tools.protoc into the build
directory after setuptools has copied the Python sources. Everything else about the package is
declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"


class BuildPyWithProtos(build_py):
    """build_py, then protoc over protos/asyncopd/v1/*.proto into the build directory."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install imports the source tree: `make proto` fills it
            return
        self.generate_stubs(Path(self.build_lib))

    @staticmethod
    def generate_stubs(out: Path) -> None:
        try:
            from grpc_tools import protoc
        except ImportError as err:  # build-system.requires lists grpcio-tools; only a no-isolation build lacks it
            raise RuntimeError("building asyncopd needs grpcio-tools (pip install grpcio-tools)") from err
        protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "asyncopd" / "v1").glob("*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files under {PROTO_ROOT / 'asyncopd' / 'v1'}")
        include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        args += [f"--grpc_python_out={out}", *protos]
        (out / "asyncopd" / "v1").mkdir(parents=True, exist_ok=True)
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        (out / "asyncopd" / "v1" / "__init__.py").touch()


setup(cmdclass={"build_py": BuildPyWithProtos})
