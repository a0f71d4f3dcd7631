"""Fill ``bench/gpu_check/carry/`` (git-ignored) with what a bare GPU machine lacks for the check.

Run here, where a package registry is reachable, before sending the tree to a GPU machine:

    .venv/bin/python bench/gpu_check/prepare.py          # or any python3 with pip

It writes, and ``bench/gpu_check/run.py`` reads on the GPU machine:

* ``wheels/``: the pinned wheels below for CPython 3.12 on x86-64 Linux (the GPU machine's
  python3; the native ones are abi3 or pure, so 3.11 and 3.13 load them too). The native
  libraries' wheels are slimmed: static libraries, headers, CMake/pkg-config files, test
  programs and the duplicate ``.so.X.Y.Z`` copies are dropped (wheels hold no symlinks), which
  takes ``libucx-cu12`` from 42 MB to about 10; their RECORD is rewritten to match.
* ``stubs/``: the generated protobuf modules ``protos/cleave/v1/*_pb2*.py`` (git-ignored, and
  the GPU machine has no ``grpcio-tools``), made first with ``protos/build.py`` when missing.
* ``manifest.json``: per wheel, its distribution, version and the version below which the
  machine's own copy is replaced (``min``; absent = only when missing).

Fails (exit 1) when the folder would pass ``--limit-mib`` (default 56: the device tool carries
64 MiB with the working tree, which is ~1.5 MiB).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARRY = os.path.join(ROOT, "bench", "gpu_check", "carry")

# (distribution, version, min version on the machine or None = install only when missing,
# slim the native libraries). The versions are requirements.txt's (what `make test` runs);
# protobuf must be at least the version that generated the stubs (it refuses older runtimes).
WHEELS = [
    ("ucxx-cu12", "0.52.0", None, True),
    ("libucxx-cu12", "0.52.0", None, True),
    ("libucx-cu12", "1.21.0", None, True),
    ("librmm-cu12", "26.10.0", None, True),    # ucxx's loader loads libucx only when librmm imports
    ("rapids-logger", "0.3.0", None, True),    # librmm's one native dependency
    ("gguf", "0.19.0", None, False),           # engine.gguf_loader (GGUF models)
    ("protobuf", "7.36.2", "@stubs", False),   # at least the stubs' gencode version
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
SLIM = re.compile(r"(\.a|\.la)$|/include/|/bin/|/cmake/|/pkgconfig/|perftest")
FULL_SONAME = re.compile(r"^(.*\.so\.\d+)\.\d+\.\d+$")    # libx.so.0.0.0, a copy of libx.so.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=CARRY, help="the carry folder (default %(default)s)")
    ap.add_argument("--limit-mib", type=float, default=56.0)
    args = ap.parse_args()
    wheels_dir, stubs_dir = os.path.join(args.out, "wheels"), os.path.join(args.out, "stubs")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(wheels_dir)
    gencode = copy_stubs(stubs_dir)
    manifest = []
    for dist, version, minimum, slimmed in WHEELS:
        path = download(dist, version, wheels_dir)
        if slimmed:
            slim(path)
        manifest.append({"dist": dist, "version": version, "wheel": os.path.basename(path),
                         **({"min": gencode if minimum == "@stubs" else minimum} if minimum else {})})
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"wheels": manifest, "python": "3.12"}, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(args.out) for n in names)
    print(f"{args.out}: {len(manifest)} wheels + stubs, {total / 2**20:.1f} MiB")
    if total > args.limit_mib * 2**20:
        print(f"prepare: over the {args.limit_mib} MiB limit; the device tool would refuse the tree")
        return 1
    return 0


def copy_stubs(dest: str) -> str:
    """Copy the generated ``*_pb2*.py`` (building them if missing); returns their gencode version."""
    src = os.path.join(ROOT, "protos", "cleave", "v1")
    if not any(n.endswith("_pb2.py") for n in os.listdir(src)):
        subprocess.run([sys.executable, os.path.join(ROOT, "protos", "build.py")], check=True)
    os.makedirs(dest)
    version = None
    for name in sorted(os.listdir(src)):
        if re.fullmatch(r".*_pb2(_grpc)?\.py", name):
            shutil.copy2(os.path.join(src, name), dest)
            found = re.search(r"Protobuf Python Version: ([\d.]+)", open(os.path.join(src, name)).read())
            version = version or (found and found.group(1))
    if version is None:
        raise SystemExit(f"prepare: no generated *_pb2.py in {src}; run `make proto` first")
    return version


def download(dist: str, version: str, dest: str) -> str:
    """``pip download`` one wheel for CPython 3.12 x86-64 Linux; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", dest, f"{dist}=={version}"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd, check=True)
    stem = dist.replace("-", "_").lower() + "-" + version + "-"
    found = [n for n in os.listdir(dest) if n.lower().startswith(stem) and n.endswith(".whl")]
    if len(found) != 1:
        raise SystemExit(f"prepare: expected one wheel {stem}*.whl in {dest}, found {found}")
    return os.path.join(dest, found[0])


def slim(path: str) -> None:
    """Rewrite the wheel at ``path`` without the entries :data:`SLIM` matches nor the
    ``libx.so.A.B.C`` that duplicate a ``libx.so.A`` (RECORD updated)."""
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        names = set(src.namelist())
        kept = [i for i in src.infolist() if i.filename != record_name and not SLIM.search(i.filename)
                and not ((m := FULL_SONAME.match(i.filename)) and m.group(1) in names)]
        lines = []
        for info in kept:
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join(lines + [f"{record_name},,"]) + "\n")
    before, after = os.path.getsize(path), os.path.getsize(tmp)
    os.replace(tmp, path)
    print(f"slimmed {os.path.basename(path)}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
