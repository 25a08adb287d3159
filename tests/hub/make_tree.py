#!/usr/bin/env python3
"""Lay out a tree for the nginx Hub look-alike (nginx.conf.template); stdlib only.

    make_tree.py ROOT SPEC [SPEC ...]

SPEC is  ORG/NAME:BRANCH:COMMIT:SRCDIR
  ORG/NAME  the repo id (org `gated`, `cdn`, `busy` get those behaviours, see README.md)
  BRANCH    branch (or tag) name to point at COMMIT; empty: none
  COMMIT    40 lowercase hex digits, or `auto` (sha1 of the files' paths and contents)
  SRCDIR    folder whose files (recursively, following symlinks) make up COMMIT;
            empty: COMMIT must already exist (just (re)point BRANCH at it)

Specs are applied in order, so `a/b:main:C1:dir1 a/b:main:C2:dir2` leaves main on C2.
Branches are re-pointed atomically (new symlink + rename). Prints one line per spec:
`ORG/NAME BRANCH COMMIT`.

Files are "LFS" (blobs/lfs/<sha256>, X-Linked-* headers, `lfs` in the listings) when their
extension is in LFS_EXTENSIONS or they are larger than 10 MiB; otherwise "git"
(blobs/git/<git blob sha1>). The layout is documented in README.md.
"""

import hashlib
import json
import os
import sys

LFS_EXTENSIONS = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
    ".npy", ".npz", ".pkl", ".zip", ".gz", ".tar", ".model", ".ot", ".tflite",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
DATE = "2024-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_EXTENSIONS) or size > LFS_MIN_SIZE


def read_source(src: str) -> dict:
    files = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, src).replace(os.sep, "/")
            with open(full, "rb") as f:
                files[rel] = f.read()
    return files


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def symlink_atomic(target: str, link: str) -> None:
    tmp = f"{link}.tmp{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def add_commit(repo_dir: str, repo_id: str, commit: str, files: dict) -> str:
    if commit == "auto":
        h = hashlib.sha1()
        for rel in sorted(files):
            h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        commit = h.hexdigest()
    commit_dir = os.path.join(repo_dir, "resolve", commit)
    if os.path.exists(commit_dir):
        raise SystemExit(f"{repo_id}: commit {commit} already exists (commits are immutable)")
    entries, siblings, dirs = [], [], set()
    for rel in sorted(files):
        data = files[rel]
        size = len(data)
        if is_lfs(rel, size):
            sha256 = hashlib.sha256(data).hexdigest()
            blob_rel = f"blobs/lfs/{sha256}"
            pointer = lfs_pointer(sha256, size)
            entry = {"type": "file", "oid": git_blob_sha1(pointer), "size": size, "path": rel,
                     "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)}}
            sibling = {"rfilename": rel, "size": size, "blobId": entry["oid"],
                       "lfs": {"sha256": sha256, "size": size, "pointerSize": len(pointer)}}
        else:
            sha1 = git_blob_sha1(data)
            blob_rel = f"blobs/git/{sha1}"
            entry = {"type": "file", "oid": sha1, "size": size, "path": rel}
            sibling = {"rfilename": rel, "size": size, "blobId": sha1}
        blob = os.path.join(repo_dir, blob_rel)
        if not os.path.exists(blob):
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            write_atomic(blob, data)
        link = os.path.join(commit_dir, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
        entries.append(entry)
        siblings.append(sibling)
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    os.makedirs(commit_dir, exist_ok=True)  # a commit without files
    for d in dirs:
        entries.append({"type": "directory", "oid": hashlib.sha1(f"tree {commit} {d}".encode()).hexdigest(),
                        "size": 0, "path": d})
    entries.sort(key=lambda e: e["path"])
    org = repo_id.split("/")[0]
    gated = org == "gated" or os.path.exists(os.path.join(repo_dir, ".gated"))
    info = {
        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": org,
        "sha": commit,
        "lastModified": DATE,
        "createdAt": DATE,
        "private": False,
        "disabled": False,
        "gated": "manual" if gated else False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(len(d) for d in files.values()),
    }
    for kind, doc in (("info", info), ("tree", entries)):
        os.makedirs(os.path.join(repo_dir, kind), exist_ok=True)
        write_atomic(os.path.join(repo_dir, kind, f"{commit}.json"), json.dumps(doc, indent=1).encode())
    return commit


def main(argv: list) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    root = os.path.abspath(argv[1])
    for spec in argv[2:]:
        try:
            repo_id, branch, commit, src = spec.split(":", 3)
            org, name = repo_id.split("/")
        except ValueError:
            raise SystemExit(f"bad spec {spec!r}, want ORG/NAME:BRANCH:COMMIT:SRCDIR")
        if commit != "auto" and (len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit)):
            raise SystemExit(f"{spec}: COMMIT must be 40 lowercase hex digits or `auto`")
        if "/" in branch or branch in (".", ".."):
            raise SystemExit(f"{spec}: branch names with '/' are not supported")
        repo_dir = os.path.join(root, org, name)
        os.makedirs(os.path.join(repo_dir, "resolve"), exist_ok=True)
        if src:
            commit = add_commit(repo_dir, repo_id, commit, read_source(src))
        elif not os.path.isdir(os.path.join(repo_dir, "resolve", commit)):
            raise SystemExit(f"{spec}: no SRCDIR and commit {commit} does not exist")
        if branch:
            symlink_atomic(commit, os.path.join(repo_dir, "resolve", branch))
        print(repo_id, branch or "-", commit)


if __name__ == "__main__":
    main(sys.argv)
