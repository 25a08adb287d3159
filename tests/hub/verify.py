#!/usr/bin/env python3
"""Self-check of the Hub look-alike: lays out a tree with make_tree.py, renders
nginx.conf.template, starts nginx, checks the HTTP behaviour with urllib and, when
huggingface_hub is importable, with the real client; then stops nginx.

    python3 tests/hub/verify.py [WORKDIR]        # stdlib-only part
    VENV/bin/python tests/hub/verify.py [WORKDIR]  # plus the huggingface_hub part

Not run by CI; see README.md. Exits non-zero on the first failed check.
"""

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "hf_test_token"
C1, C2 = "1" * 40, "2" * 40
checks = 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    checks += 1


def req(port, method, path, headers=None, host="127.0.0.1"):
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def main():
    work = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hubverify.")
    if os.path.exists(work) and os.listdir(work):
        raise SystemExit(f"{work} is not empty")
    src, root, prefix = (os.path.join(work, d) for d in ("src", "root", "prefix"))
    files = {}
    for v in (1, 2):
        d = os.path.join(src, f"v{v}")
        os.makedirs(os.path.join(d, "tok"))
        files[v] = {
            "config.json": b'{"v": %d}\n' % v,
            "model.safetensors": os.urandom(1024 * 1024 + v),
            "tok/tokenizer.json": b'{"t": %d}\n' % v,
            "README.md": b"# readme\n",
        }
        for rel, data in files[v].items():
            with open(os.path.join(d, rel), "wb") as f:
                f.write(data)
    v1 = os.path.join(src, "v1")
    subprocess.run([sys.executable, os.path.join(HERE, "make_tree.py"), root,
                    f"acme/tiny:main:{C1}:{v1}", f"acme/tiny:dev:{C2}:{src}/v2",
                    f"gated/secret:main:{C1}:{v1}", f"cdn/big:main:{C1}:{v1}", f"cdnhost/big:main:{C1}:{v1}",
                    f"busy/slow:main:{C1}:{v1}"], check=True, stdout=subprocess.DEVNULL)

    port, cdn = free_port(), free_port()
    os.makedirs(prefix)
    conf = open(os.path.join(HERE, "nginx.conf.template")).read()
    for k, v in (("@ROOT@", root), ("@PORT@", str(port)), ("@CDN_PORT@", str(cdn)), ("@TOKEN@", TOKEN)):
        conf = conf.replace(k, v)
    with open(os.path.join(prefix, "nginx.conf"), "w") as f:
        f.write(conf)
    nginx = subprocess.Popen(["nginx", "-e", "stderr", "-p", prefix, "-c", os.path.join(prefix, "nginx.conf")])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                socket.create_connection(("127.0.0.1", cdn), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        http_checks(port, cdn, root, files)
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            print("huggingface_hub not importable: client checks skipped")
        else:
            client_checks(port, work, root, files)
        errors = open(os.path.join(prefix, "error.log")).read()
        check(errors == "", f"error.log is empty, got:\n{errors}")
    finally:
        nginx.terminate()
        nginx.wait(10)
    print(f"{checks} passed, 0 failed")


def http_checks(port, cdn, root, files):
    sha = hashlib.sha256(files[1]["model.safetensors"]).hexdigest()
    size = len(files[1]["model.safetensors"])
    s, h, b = req(port, "HEAD", "/acme/tiny/resolve/main/model.safetensors")
    check(s == 200 and h["x-repo-commit"] == C1 and h["etag"] == f'"{sha}"', "HEAD by branch")
    check(h["x-linked-etag"] == f'"{sha}"' and h["x-linked-size"] == str(size) and h["content-length"] == str(size), "X-Linked-*")
    s, h, b = req(port, "GET", "/acme/tiny/resolve/dev/config.json")
    check(s == 200 and b == files[2]["config.json"] and h["x-repo-commit"] == C2 and "x-linked-size" not in h, "GET git file")
    check(h["etag"] == '"%s"' % hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest(), "git blob ETag")
    s, h, b = req(port, "GET", f"/acme/tiny/resolve/{C1}/model.safetensors", {"Range": "bytes=10-19"})
    check(s == 206 and b == files[1]["model.safetensors"][10:20] and h["content-range"] == f"bytes 10-19/{size}", "Range")
    s, h, b = req(port, "GET", "/acme/tiny/resolve/main/model.safetensors", {"Range": "bytes=0-0", "If-Range": f'"{sha}"'})
    check(s == 206, "If-Range with the ETag")
    s, h, b = req(port, "GET", "/acme/tiny/resolve/main/model.safetensors", {"If-None-Match": f'"{sha}"'})
    check(s == 304 and h["x-repo-commit"] == C1, "If-None-Match")
    s, h, b = req(port, "GET", "/acme/tiny/resolve/main/model.safetensors", {"Range": f"bytes={size}-"})
    check(s == 416 and h["content-range"] == f"bytes */{size}", "416")
    for path, status, code in (
        ("/nope/x/resolve/main/config.json", 404, "RepoNotFound"),
        ("/api/models/nope/x", 404, "RepoNotFound"),
        ("/acme/tiny/resolve/nob/config.json", 404, "RevisionNotFound"),
        ("/api/models/acme/tiny/revision/nob", 404, "RevisionNotFound"),
        ("/acme/tiny/resolve/main/nofile", 404, "EntryNotFound"),
        ("/gated/secret/resolve/main/config.json", 401, "GatedRepo"),
    ):
        s, h, b = req(port, "GET", path)
        check(s == status and h.get("x-error-code") == code and b.startswith(b'{"error":'), f"{path} -> {status} {code}")
    check(h["x-error-message"].startswith("Access to model gated/secret is restricted"), "gated message")
    s, h, b = req(port, "GET", "/acme/tiny/resolve/main/nofile")
    check(h.get("x-repo-commit") == C1, "EntryNotFound carries X-Repo-Commit")
    s, h, b = req(port, "GET", "/gated/secret/resolve/main/config.json", {"Authorization": "Bearer nope"})
    check(s == 403 and h.get("x-error-code") == "GatedRepo", "gated, wrong token -> 403")
    s, h, b = req(port, "GET", "/gated/secret/resolve/main/config.json", {"Authorization": f"Bearer {TOKEN}"})
    check(s == 200 and b == files[1]["config.json"], "gated with token")
    s, h, b = req(port, "GET", "/api/models/acme/tiny/revision/dev")
    check(s == 200 and h["content-type"] == "application/json" and b'"sha": "%s"' % C2.encode() in b, "revision API")
    s, h, b = req(port, "GET", "/api/models/acme/tiny/tree/main?recursive=true")
    check(s == 200 and b'"path": "tok/tokenizer.json"' in b, "tree API")
    # 302 to the CDN, with the metadata on the 302 itself
    s, h, b = req(port, "HEAD", "/cdn/big/resolve/main/model.safetensors", {"Authorization": "Bearer x"})
    loc = f"http://127.0.0.1:{cdn}/cdn/big/blobs/lfs/{sha}"
    check(s == 302 and h["location"] == loc and h["x-repo-commit"] == C1 and h["x-linked-size"] == str(size)
          and h["x-linked-etag"] == f'"{sha}"', "302 to the CDN")
    cpath = loc.split(str(cdn), 1)[1]
    s, h, b = req(cdn, "GET", cpath, {"Range": "bytes=5-"})
    check(s == 206 and b == files[1]["model.safetensors"][5:], "CDN range")
    s, h, b = req(cdn, "GET", cpath, {"Authorization": "Bearer x"})
    check(s == 403 and b"token forwarded" in b, "CDN refuses a forwarded token")
    s, h, b = req(port, "GET", "/cdnhost/big/resolve/main/config.json")
    loc = f"http://127.0.0.2:{cdn}/cdnhost/big/blobs/git/"
    check(s == 302 and h["location"].startswith(loc), "302 to the CDN on 127.0.0.2")
    s, h, b = req(cdn, "GET", h["location"].split(str(cdn), 1)[1], host="127.0.0.2")
    check(s == 200 and b == files[1]["config.json"], "CDN on 127.0.0.2")
    # 429: org busy (1 request/s), and the .throttle marker
    time.sleep(1.1)
    got = [req(port, "GET", "/busy/slow/resolve/main/config.json")[:2] for _ in range(3)]
    check([g[0] for g in got] == [200, 429, 429] and got[1][1].get("retry-after") == "1", "busy: 200 then 429")
    time.sleep(1.1)
    check(req(port, "GET", "/busy/slow/resolve/main/config.json")[0] == 200, "busy: 200 after 1 s")
    marker = os.path.join(root, "acme/tiny/.throttle")
    open(marker, "w").close()
    check(req(port, "GET", "/acme/tiny/resolve/main/config.json")[0] == 429, ".throttle -> 429")
    os.unlink(marker)
    check(req(port, "GET", "/acme/tiny/resolve/main/config.json")[0] == 200, "marker gone -> 200")


def client_checks(port, work, root, files):
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    os.environ["HF_HUB_CACHE"] = cache = os.path.join(work, "cache")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("HF_TOKEN", None)
    import huggingface_hub
    from huggingface_hub import errors, hf_hub_download, snapshot_download
    print("huggingface_hub", huggingface_hub.__version__)
    pats = ["*.safetensors", "*.json"]
    repo = os.path.join(cache, "models--acme--tiny")

    def same(path, v, rel):
        return open(path, "rb").read() == files[v][rel]

    p = snapshot_download("acme/tiny", allow_patterns=pats)
    check(p == os.path.join(repo, "snapshots", C1) and open(os.path.join(repo, "refs/main")).read() == C1, "snapshot main")
    check(sorted(os.listdir(p)) == ["config.json", "model.safetensors", "tok"], "allow_patterns")
    check(all(same(os.path.join(p, r), 1, r) for r in ("config.json", "model.safetensors", "tok/tokenizer.json")), "content")
    sha = hashlib.sha256(files[1]["model.safetensors"]).hexdigest()
    check(os.readlink(os.path.join(p, "model.safetensors")) == f"../../blobs/{sha}", "blob named by X-Linked-Etag")
    p = snapshot_download("acme/tiny", revision="dev", allow_patterns=pats)
    check(p.endswith(C2) and open(os.path.join(repo, "refs/dev")).read() == C2, "snapshot dev")
    check(snapshot_download("acme/tiny", revision=C1, allow_patterns=pats).endswith(C1), "snapshot by commit")
    f = hf_hub_download("acme/tiny", "tokenizer.json", subfolder="tok", revision="dev")
    check(f.endswith(f"{C2}/tok/tokenizer.json") and same(f, 2, "tok/tokenizer.json"), "hf_hub_download dev")
    f = hf_hub_download("acme/tiny", "README.md", revision=C2)
    check(f.endswith(f"{C2}/README.md"), "hf_hub_download commit")
    # move main to C2: one symlink
    subprocess.run([sys.executable, os.path.join(HERE, "make_tree.py"), root, f"acme/tiny:main:{C2}:"],
                   check=True, stdout=subprocess.DEVNULL)
    f = hf_hub_download("acme/tiny", "model.safetensors")
    check(f.endswith(f"{C2}/model.safetensors") and open(os.path.join(repo, "refs/main")).read() == C2, "moved branch")
    for exc, fn, args, kw in (
        (errors.RepositoryNotFoundError, hf_hub_download, ("nope/x", "a"), {}),
        (errors.RepositoryNotFoundError, snapshot_download, ("nope/x",), {}),
        (errors.RevisionNotFoundError, hf_hub_download, ("acme/tiny", "a"), {"revision": "nob"}),
        (errors.RevisionNotFoundError, snapshot_download, ("acme/tiny",), {"revision": "nob"}),
        (errors.EntryNotFoundError, hf_hub_download, ("acme/tiny", "nofile"), {}),
        (errors.GatedRepoError, hf_hub_download, ("gated/secret", "config.json"), {}),
        (errors.GatedRepoError, hf_hub_download, ("gated/secret", "config.json"), {"token": "nope"}),
        (errors.GatedRepoError, snapshot_download, ("gated/secret",), {}),
    ):
        try:
            fn(*args, **kw)
            check(False, f"{fn.__name__}{args} raises {exc.__name__}")
        except exc:
            check(True, "")
    check(os.path.exists(os.path.join(repo, ".no_exist", C2, "nofile")), ".no_exist under X-Repo-Commit")
    p = snapshot_download("gated/secret", allow_patterns=pats, token=TOKEN)
    check(same(os.path.join(p, "model.safetensors"), 1, "model.safetensors"), "gated with token")
    # The CDN answers 403 if the token reaches it. huggingface_hub 1.x takes 127.0.0.1:CDN_PORT
    # for the hub's own host (it compares host names, not ports), follows the 302 itself with
    # the token and reads the metadata from the CDN's answer: org `cdn` is for 2.x only.
    if int(huggingface_hub.__version__.split(".")[0]) >= 2:
        p = snapshot_download("cdn/big", allow_patterns=pats, token="some-token")
        check(same(os.path.join(p, "model.safetensors"), 1, "model.safetensors"), "via the CDN (port), token kept")
    p = snapshot_download("cdnhost/big", allow_patterns=pats, token="some-token")
    check(same(os.path.join(p, "model.safetensors"), 1, "model.safetensors"), "via the CDN (host), token not forwarded")
    marker = os.path.join(root, "acme/tiny/.throttle")
    open(marker, "w").close()
    threading.Timer(2.5, os.unlink, [marker]).start()
    f = hf_hub_download("acme/tiny", "README.md", revision=C1)  # not cached yet: retried on 429
    check(same(f, 1, "README.md"), "429 then OK")


if __name__ == "__main__":
    main()
