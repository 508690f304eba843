"""prebuilt/MANIFEST: what the modules that benchmarks/prebuild_gpu.sh built on a CPU machine were built for, and
whether they fit the machine and tree gpu_check.sh runs in (then they replace its build).

    python benchmarks/prebuilt.py write DIR --arch 9.0 --commit C --compiler TEXT --seconds S   (prebuild_gpu.sh)
    python benchmarks/prebuilt.py check DIR --arch 9.0    exit 0: fits; 1: it does not, and why, on stdout (gpu_check.sh)

A fit: the same torch version, Python extension suffix (the interpreter's minor version and ABI), CUDA architectures
and sources (a hash of csrc/ and setup.py, names and contents, of the tree the script runs in).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import pathlib
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEYS = ("torch", "ext_suffix", "arch", "sources")  # what must match


def source_hash(root: pathlib.Path = ROOT) -> str:
    """sha256 over the relative path and bytes of every file under csrc/, and setup.py, in sorted order."""
    files = sorted([*(p for p in (root / "csrc").rglob("*") if p.is_file()), root / "setup.py"])
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def here(arch: str, root: pathlib.Path = ROOT) -> dict[str, str]:
    """The values KEYS take for this interpreter, torch and tree."""
    import torch

    return {"torch": torch.__version__, "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "arch": arch,
            "sources": source_hash(root)}


def read(manifest: pathlib.Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in manifest.read_text().splitlines() if "=" in line)


def mismatches(manifest: dict[str, str], current: dict[str, str]) -> list[str]:
    """Why the prebuilt modules do not fit (empty: they do)."""
    return [f"{k} is {current[k]} here, {manifest.get(k, '(missing)')} in prebuilt/MANIFEST"
            for k in KEYS if manifest.get(k) != current[k]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("write", "check"))
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("--arch", required=True, help="TORCH_CUDA_ARCH_LIST built for (write) or the GPU's (check)")
    p.add_argument("--root", type=pathlib.Path, default=ROOT, help="the tree whose sources are hashed")
    p.add_argument("--commit", default="")
    p.add_argument("--compiler", default="")
    p.add_argument("--seconds", type=int, default=0)
    args = p.parse_args(argv)
    manifest = args.dir / "MANIFEST"
    if args.action == "write":
        info = {**here(args.arch, args.root), "commit": args.commit, "compiler": args.compiler,
                "built": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ} in {args.seconds} s"}
        manifest.write_text("".join(f"{k}={v}\n" for k, v in info.items()))
        print(manifest.read_text(), end="")
        return 0
    if not manifest.is_file():
        print(f"no {manifest}")
        return 1
    why = mismatches(read(manifest), here(args.arch, args.root))
    print("; ".join(why) if why else "fits")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
