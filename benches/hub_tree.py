#!/usr/bin/env python3
"""Publish model folders as Hub repos for the Hub benchmarks, without reading them.

    hub_tree.py ROOT ORG/NAME=SRCDIR [...]

Lays out ROOT as tests/hub/README.md describes (resolve/COMMIT/FILE -> blobs/lfs/HASH,
resolve/main -> COMMIT, info/ and tree/ JSON), with every blob a hard link to the source
file. The tests hash file contents; a benchmark's sources are terabytes of sparse files, so
here a blob's name is the SHA-256 of its repo, path and size (nginx serves it as the ETag and
never checks it). ROOT must be on the sources' filesystem.
"""

import hashlib
import json
import os
import sys


def publish(root: str, repo: str, src: str) -> None:
    files = []
    for dirpath, dirnames, names in os.walk(src):
        dirnames.sort()
        for n in sorted(names):
            full = os.path.join(dirpath, n)
            files.append((os.path.relpath(full, src), full, os.path.getsize(full)))
    commit = hashlib.sha1(repr((repo, [(r, s) for r, _, s in files])).encode()).hexdigest()
    base = os.path.join(root, repo)
    for d in ("blobs/lfs", "info", "tree", "resolve/" + commit):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    siblings, tree = [], []
    for rel, full, size in files:
        blob = hashlib.sha256(f"{repo}/{rel}/{size}".encode()).hexdigest()
        dest = os.path.join(base, "blobs/lfs", blob)
        if not os.path.exists(dest):
            os.link(full, dest)
        link = os.path.join(base, "resolve", commit, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            depth = rel.count("/") + 2
            os.symlink("../" * depth + "blobs/lfs/" + blob, link)
        pointer = hashlib.sha1(blob.encode()).hexdigest()
        lfs = {"size": size, "pointerSize": 134}
        siblings.append({"rfilename": rel, "size": size, "blobId": pointer,
                         "lfs": dict(lfs, sha256=blob)})
        tree.append({"type": "file", "oid": pointer, "size": size, "path": rel,
                     "lfs": dict(lfs, oid=blob)})
    info = {"id": repo, "modelId": repo, "sha": commit, "private": False, "gated": False,
            "siblings": siblings}
    with open(os.path.join(base, "info", commit + ".json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(base, "tree", commit + ".json"), "w") as f:
        json.dump(tree, f)
    main = os.path.join(base, "resolve", "main")
    if os.path.lexists(main):
        os.remove(main)
    os.symlink(commit, main)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for spec in sys.argv[2:]:
        repo, src = spec.split("=", 1)
        publish(sys.argv[1], repo, src)
