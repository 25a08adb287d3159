//! Object storage for real: inputs and output on an S3-compatible server (s3s-fs) give the
//! same bytes as local disk, and its errors say what is wrong.

use crate::golden::{merge_fixture, shard_size, CASES};
use crate::util::*;

/// Put the fixture models into a bucket of the S3 server.
fn upload_fixture_models(s3: &S3Server) {
    copy_dir(&fixtures().join("models"), &s3.bucket("models"));
    s3.bucket("merged");
}

#[test]
fn s3_in_and_out_is_byte_identical_to_local() {
    let s3 = S3Server::start();
    upload_fixture_models(&s3);
    for (case, _) in CASES {
        let local = tmp();
        merge_fixture(case, local.path(), &[]);
        let cfg = std::fs::read_to_string(fixtures().join(case).join("config.yml"))
            .unwrap()
            .replace("./models/", "s3://models/");
        let dir = tmp();
        std::fs::write(dir.path().join("config.yml"), &cfg).unwrap();
        let url = format!("s3://merged/{case}/");
        let ss = shard_size(case);
        let o = run_in(
            dir.path(),
            &["merge", "config.yml", &url, "--out-shard-size", &ss, "-q"],
            &s3.env(),
        );
        assert_ok(&o);
        let remote = s3.root.path().join("merged").join(case);
        assert_eq!(weight_files(&remote), weight_files(local.path()), "{case}");
        for f in weight_files(local.path())
            .iter()
            .map(String::as_str)
            .chain(["config.json"])
        {
            assert!(
                std::fs::read(remote.join(f)).unwrap()
                    == std::fs::read(local.path().join(f)).unwrap(),
                "{case}: {f} differs between S3 and local"
            );
        }
        // Reads split into many small parts, fetched concurrently: the same bytes.
        let parts_url = format!("s3://merged/{case}-parts/");
        let o = run_in(
            dir.path(),
            &[
                "merge",
                "config.yml",
                &parts_url,
                "--out-shard-size",
                &ss,
                "-q",
                "--read-part-size",
                "1000",
                "--read-concurrency",
                "3",
            ],
            &s3.env(),
        );
        assert_ok(&o);
        let split = s3.root.path().join("merged").join(format!("{case}-parts"));
        for f in weight_files(local.path()) {
            assert!(
                std::fs::read(split.join(&f)).unwrap()
                    == std::fs::read(local.path().join(&f)).unwrap(),
                "{case}: {f} differs when read in parts"
            );
        }
        // The plan works from S3 headers alone.
        let p = run_in(
            dir.path(),
            &["plan", "config.yml", "--out-shard-size", &ss],
            &s3.env(),
        );
        assert_ok(&p);
    }
}

/// An upload to an object store holds up to 80 MiB of parts: `--memory-limit` counts them,
/// refusing a limit that leaves no room (with the reason), and merging within one that does.
#[test]
fn an_object_store_output_counts_its_upload_in_the_memory_limit() {
    let s3 = S3Server::start();
    s3.bucket("merged");
    let cfg = root().join("examples/model_stock.yml");
    let merge = |limit: &str, out: &str| {
        run_in(
            &root(),
            &[
                "merge",
                cfg.to_str().unwrap(),
                out,
                "-q",
                "--memory-limit",
                limit,
            ],
            &s3.env(),
        )
    };
    let o = merge("60MiB", "s3://merged/small/");
    let msg = assert_exit(&o, 2);
    assert!(msg.contains("for uploading to the object store"), "{msg}");
    assert!(!s3.root.path().join("merged/small").exists());
    // The same limit is plenty on local disk, and 90 MiB is enough for S3.
    let local = tmp();
    assert_ok(&merge("60MiB", local.path().to_str().unwrap()));
    assert_ok(&merge("90MiB", "s3://merged/fits/"));
    assert_same_checkpoint(&s3.root.path().join("merged/fits"), local.path());
}

#[test]
fn s3_errors_say_what_is_wrong() {
    let s3 = S3Server::start();
    upload_fixture_models(&s3);
    let dir = tmp();
    let cfg = std::fs::read_to_string(fixtures().join("basic_bf16/config.yml"))
        .unwrap()
        .replace("./models/", "s3://models/");
    std::fs::write(dir.path().join("config.yml"), &cfg).unwrap();
    let mut env = s3.env();
    env.push(("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "2".into()));

    // A missing bucket, for an input and for the output.
    std::fs::write(
        dir.path().join("nobucket.yml"),
        cfg.replace("s3://models/ft3", "s3://no-such-bucket/ft3"),
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["merge", "nobucket.yml", "s3://merged/w/"],
        &env,
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("s3://no-such-bucket/ft3"), "{}", text(&o));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://no-such-bucket/out/"],
        &env,
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("no-such-bucket"), "{}", text(&o));

    // A missing model prefix in the input bucket.
    std::fs::write(
        dir.path().join("bad.yml"),
        cfg.replace("s3://models/ft3", "s3://models/ft9"),
    )
    .unwrap();
    let o = run_in(dir.path(), &["merge", "bad.yml", "s3://merged/x/"], &env);
    assert_exit(&o, 2);
    assert!(text(&o).contains("s3://models/ft9"), "{}", text(&o));

    // Wrong credentials.
    let mut wrong = env.clone();
    wrong.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    wrong.push(("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://merged/y/"],
        &wrong,
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("s3://models/"), "{}", text(&o));

    // An unreachable endpoint.
    let mut gone = env.clone();
    gone.retain(|(k, _)| k != "AWS_ENDPOINT");
    gone.push(("AWS_ENDPOINT".into(), "http://127.0.0.1:9".into()));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://merged/z/"],
        &gone,
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("s3://models/"), "{}", text(&o));
    assert!(!looks_complete(&s3.root.path().join("merged/z")));
}
