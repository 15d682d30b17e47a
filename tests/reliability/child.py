"""Child process for the SIGKILL tests: runs one operation in a loop on fresh copies.

Usage: python child.py SPEC.pickle WORKROOT

SPEC.pickle holds (operation name, GeneratedChain, seed).  Each iteration
copies the pristine chain to WORKROOT/itN, records N in WORKROOT/current
(atomically, after the copy is complete) and runs the operation on itN.  The
parent kills the process at a random moment and checks WORKROOT/it<current>.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import scenarios  # noqa: E402


def main() -> None:
    spec_path, root = sys.argv[1], sys.argv[2]
    with open(spec_path, "rb") as f:
        name, ch, seed = pickle.load(f)
    sc = scenarios.build(name, ch, seed, prepare=False)  # the parent prepared it
    it = 0
    while True:
        work = os.path.join(root, f"it{it}")
        shutil.copytree(ch.directory, work, symlinks=True)
        tmp = os.path.join(root, "current.tmp")
        with open(tmp, "w") as f:
            f.write(str(it))
        os.replace(tmp, os.path.join(root, "current"))
        sc.op(work)
        # drop an old iteration to keep the directory small
        old = os.path.join(root, f"it{it - 2}")
        if it >= 2 and os.path.exists(old):
            shutil.rmtree(old, ignore_errors=True)
        it += 1


if __name__ == "__main__":
    main()
