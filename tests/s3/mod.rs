//! Object storage for real: inputs and output on an S3-compatible server (s3s-fs) give the
//! same bytes as local disk, and its errors say what is wrong.

use std::time::Duration;

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
    // As a Job's next pod: the dead merge's lock (which it could not remove) is taken over
    // at once instead of going stale.
    env.push(("MERGEFLEET_OWNER".into(), "job-uid-7".into()));

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

/// A merge that died with its store leaves incomplete multipart uploads it could not
/// abort (invisible, and billed on S3). It recorded them under the output before sending
/// a part, so `plan CONFIG OUT` counts them without touching anything, and the next merge
/// that takes the output aborts every one and says so.
#[test]
fn uploads_a_dead_merge_left_open_are_aborted_by_the_next_merge() {
    let mut s3 = S3Server::start();
    let (d, _) = s3.slow_set();
    let mut env = s3.env();
    env.push(("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "2".into()));
    // As a Job's next pod: the dead merge's lock (which it could not remove) is taken over
    // at once instead of going stale.
    env.push(("MERGEFLEET_OWNER".into(), "job-uid-7".into()));
    let args = S3Server::SLOW_MERGE;
    let mut p = Proc::spawn(&args, d.path(), &env, d.path().join("merge.log"));
    // Kill the store while a shard's upload is open and recorded.
    let record = s3.root.path().join("merged/out/.mergefleet-uploads.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !record.exists() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    s3.stop();
    let st = p.wait(60);
    assert!(!st.success(), "{}", p.log());
    s3.start_again();
    let left = s3.open_uploads();
    assert!(left >= 1, "the dead merge left no upload open");

    let plan = run_in(d.path(), &["plan", "config.yml", "s3://merged/out"], &env);
    assert!(
        text(&plan).contains(&format!("{left} incomplete upload(s)")),
        "{}",
        text(&plan)
    );
    assert_eq!(s3.open_uploads(), left, "plan changed the store");

    let o = run_in(d.path(), &args, &env);
    assert_ok(&o);
    assert!(
        text(&o).contains(&format!("aborted {left} incomplete upload(s)")),
        "{}",
        text(&o)
    );
    assert_eq!(s3.open_uploads(), 0, "uploads left open after a good merge");
    assert!(!s3
        .root
        .path()
        .join("merged/out/.mergefleet-uploads.json")
        .exists());
}
