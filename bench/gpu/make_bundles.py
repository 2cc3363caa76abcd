"""Download the GPU machine's wheels and pack them into carry bundles of at most 56 MiB.

Why: the GPU machine has no network and each command sent to it carries at most 64 MiB of
ignored files, so the wheels over the cap (torch, vLLM, triton, NCCL) travel in parts and the rest in folders.

    .venv/bin/python bench/gpu/make_bundles.py            # download what is missing, (re)pack
    .venv/bin/python bench/gpu/make_bundles.py --no-download

Inputs: bench/gpu/wheels.txt (policy + pinned requirement per line).
Outputs: gpu-wheels/wheels/*.whl (downloads, gitignored), gpu-wheels/bundle-N/ (carry folders,
gitignored), bench/gpu/wheels.lock (what install.sh expects, with sha256) and
bench/gpu/bundles.txt (bundle order and sizes), both committed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WHEELS_TXT = HERE / "wheels.txt"
LOCK = HERE / "wheels.lock"
BUNDLES_TXT = HERE / "bundles.txt"
STORE = ROOT / "gpu-wheels"
MIB = 1024 * 1024
# Newest first is not needed: pip accepts a wheel tagged with any of these platforms.
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_18_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64", "any"]


@dataclass
class Item:
    """One file that travels: a whole wheel or one part of a split wheel."""

    path: Path
    size: int


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wanted() -> list[tuple[str, str, str]]:
    """(policy, name, version) per line of wheels.txt."""
    out = []
    for line in WHEELS_TXT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        policy, req = line.split()
        name, version = req.split("==")
        if policy not in ("always", "older", "missing"):
            raise SystemExit(f"{WHEELS_TXT}: unknown policy {policy!r}")
        out.append((policy, name, version))
    return out


def find_wheel(folder: Path, name: str, version: str) -> Path | None:
    for whl in folder.glob("*.whl"):
        wname, wver = whl.name.split("-")[:2]
        if norm(wname) == norm(name) and wver == version:
            return whl
    return None


def download(folder: Path, name: str, version: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run([*cmd, f"{name}=={version}"], check=True)
    found = find_wheel(folder, name, version)
    if found is None:
        raise SystemExit(f"pip download {name}=={version} left no matching wheel in {folder}")
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def split(path: Path, out_dir: Path, part_size: int) -> list[Path]:
    """`split -b` in Python: PATH.part-00, -01, ... each at most part_size bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with path.open("rb") as f:
        for k in range(1000):
            data = f.read(part_size)
            if not data:
                break
            part = out_dir / f"{path.name}.part-{k:02d}"
            part.write_bytes(data)
            parts.append(part)
    return parts


def pack(items: list[Item], cap: int) -> list[list[Item]]:
    """First-fit decreasing: few bundles, each under the cap."""
    bins: list[list[Item]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda i: (-i.size, i.path.name)):
        if item.size > cap:
            raise SystemExit(f"{item.path.name} ({item.size / MIB:.1f} MiB) is over the {cap / MIB:.0f} MiB cap")
        for k, free in enumerate(room):
            if item.size <= free:
                bins[k].append(item)
                room[k] -= item.size
                break
        else:
            bins.append([item])
            room.append(cap - item.size)
    return bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing wheel")
    ap.add_argument("--cap-mib", type=float, default=56.0,
                    help="bundle size limit (a command carries 64 MiB, the repository's tree included)")
    args = ap.parse_args()
    cap = int(args.cap_mib * MIB)
    wheels_dir = STORE / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)

    lock_lines = ["# kind policy file sha256 bytes [whole-wheel]  (written by make_bundles.py; install.sh reads it)"]
    items: list[Item] = []
    parts_dir = STORE / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    for policy, name, version in read_wanted():
        whl = find_wheel(wheels_dir, name, version)
        if whl is None:
            if args.no_download:
                raise SystemExit(f"missing {name}=={version} in {wheels_dir}")
            whl = download(wheels_dir, name, version)
        size = whl.stat().st_size
        lock_lines.append(f"wheel {policy} {whl.name} {sha256(whl)} {size}")
        if size > cap:
            for part in split(whl, parts_dir, cap):
                lock_lines.append(f"part - {part.name} {sha256(part)} {part.stat().st_size} {whl.name}")
                items.append(Item(part, part.stat().st_size))
        else:
            items.append(Item(whl, size))

    for old in STORE.glob("bundle-*"):
        shutil.rmtree(old)
    listing = ["# bundle MiB files  (carry gpu-wheels/bundle-N, one per command; see README.md)"]
    for n, bundle in enumerate(pack(items, cap), start=1):
        folder = STORE / f"bundle-{n}"
        folder.mkdir()
        for item in bundle:
            shutil.copy2(item.path, folder / item.path.name)  # copies: the downloads stay whole
        total = sum(i.size for i in bundle)
        listing.append(f"bundle-{n} {total / MIB:.1f} " + " ".join(sorted(i.path.name for i in bundle)))
    LOCK.write_text("\n".join(lock_lines) + "\n")
    BUNDLES_TXT.write_text("\n".join(listing) + "\n")
    print("\n".join(line.split(" ")[0] + " " + line.split(" ")[1] + " MiB" for line in listing[1:]))


if __name__ == "__main__":
    main()
