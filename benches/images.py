#!/usr/bin/env python3
"""Writes the benchmark input images into a folder, each SIZE_MIB MiB:

    images.py DIR SIZE_MIB [NAME ...]   (default: mixed zero90 sparse)

mixed: 1 MiB runs, random then zero; zero90: 90 % zero (one random MiB in ten); sparse:
holes with 1 MiB of random data every 64 MiB. The random data is 8 MiB of os.urandom
reused, so images are incompressible but cheap to make.
"""
import os
import sys

ONE = 1 << 20


def main(argv):
    d, mib = argv[0], int(argv[1])
    names = argv[2:] or ["mixed", "zero90", "sparse"]
    rnd = os.urandom(ONE * 8)

    def chunk(i):
        off = (i * 7919 % 8) * ONE
        return rnd[off:off + ONE]

    for name in names:
        with open(os.path.join(d, name + ".raw"), "wb") as f:
            if name == "mixed":
                for i in range(mib):
                    f.write(chunk(i) if i % 2 == 0 else bytes(ONE))
            elif name == "zero90":
                for i in range(mib):
                    f.write(chunk(i) if i % 10 == 0 else bytes(ONE))
            elif name == "sparse":
                f.truncate(mib * ONE)
                for i in range(0, mib, 64):
                    f.seek(i * ONE)
                    f.write(chunk(i))
            else:
                sys.exit(f"unknown image {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
