//! Hugging Face Hub ids against a real HTTP server shaped like the Hub (nginx, see
//! `tests/hub/README.md`): merges read straight from it equal the same models as local
//! folders; a branch moved mid-merge changes nothing; every Hub refusal names the repo and
//! what to do; 429s are waited out; a redirect to another host never gets the token; and
//! the real huggingface_hub client fills a cache that mergefleet merges from offline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::util::hub::{HubServer, TOKEN};
use crate::util::*;

/// The sharded golden's three models (base, two fine-tunes; 3, 2 and 2 shards).
const SET: [(&str, &str); 3] = [
    ("acme/base", "base_sh"),
    ("acme/ft-one", "ft1_sh"),
    ("acme/ft-two", "ft2_sh"),
];

fn config(base: &str, a: &str, b: &str) -> String {
    format!(
        "models:\n  - model: {a}\n  - model: {b}\nmerge_method: model_stock\nbase_model: {base}\ndtype: float32\nout_dtype: float16\n"
    )
}

/// Shards small enough that the output has several files and the merge several tasks.
const LAYOUT: [&str; 4] = ["--out-shard-size", "40K", "--task-size", "1"];

/// Publish the set on `hub` (branch `main`).
fn publish_set(hub: &HubServer) {
    for (repo, dir) in SET {
        hub.publish(repo, "main", &fixtures().join("models").join(dir));
    }
}

/// The same merge from the local folders.
fn local_merge() -> TempDir {
    let dir = tmp();
    let cfg = dir.path().join("local.yml");
    std::fs::write(
        &cfg,
        config("./models/base_sh", "./models/ft1_sh", "./models/ft2_sh"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let mut args = vec!["merge", cfg.to_str().unwrap(), out.to_str().unwrap(), "-q"];
    args.extend(LAYOUT);
    assert_ok(&run_in(&fixtures(), &args, &[]));
    dir
}

/// Write `text` to a config file of its own in `dir` (named by its length and hash, so
/// several configs of one test never overwrite each other).
fn write_config(dir: &Path, text: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    let p = dir.join(format!("config-{:016x}.yml", h.finish()));
    std::fs::write(&p, text).unwrap();
    p
}

/// Merge `cfg` in a fresh working directory with `env`; returns the output.
fn hub_merge(cfg: &Path, env: &[(String, String)], extra: &[&str]) -> (TempDir, String) {
    let out = tmp();
    let target = out.path().join("out");
    let mut args = vec!["merge", cfg.to_str().unwrap(), target.to_str().unwrap()];
    args.extend(LAYOUT);
    args.extend_from_slice(extra);
    let o = run_in(out.path(), &args, env);
    let t = assert_exit(&o, 0);
    (out, t)
}

#[test]
fn hub_ids_merge_as_their_local_folders_and_nothing_is_written_to_disk() {
    let hub = HubServer::start();
    publish_set(&hub);
    let cache = tmp();
    let env = hub.env(&cache.path().join("hf"));
    let work = tmp();
    let cfg = write_config(
        work.path(),
        &config("acme/base", "acme/ft-one", "acme/ft-two"),
    );

    // plan reads headers only: no tensor bytes leave the Hub.
    let o = run_in(work.path(), &["plan", cfg.to_str().unwrap()], &env);
    assert_exit(&o, 0);
    let ranges_before = hub.requests().matches(".safetensors").count();

    let (out, _) = hub_merge(&cfg, &env, &[]);
    let local = local_merge();
    assert_same_checkpoint(&out.path().join("out"), &local.path().join("out"));
    assert!(
        hub.requests().matches(".safetensors").count() > ranges_before,
        "the merge read its tensors from the Hub"
    );
    // Nothing under the cache or HF_HOME: the Hub is read, never downloaded.
    assert!(!cache.path().join("hf").exists(), "a cache was written");
    // The card and the saved config keep the ids as written.
    let card = std::fs::read_to_string(out.path().join("out/README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:\n- acme/base\n- acme/ft-one\n- acme/ft-two\n"),
        "{card}"
    );
    assert!(
        card.contains("* [acme/ft-one](https://huggingface.co/acme/ft-one)"),
        "{card}"
    );
    let saved = std::fs::read_to_string(out.path().join("out/mergekit_config.yml")).unwrap();
    assert_eq!(saved, config("acme/base", "acme/ft-one", "acme/ft-two"));
}

#[test]
fn a_two_worker_cluster_reads_the_hub_and_a_branch_moved_mid_merge_changes_nothing() {
    let hub = HubServer::start();
    publish_set(&hub);
    // A second commit of ft-one (ft3's weights) that `main` moves to once the coordinator
    // has planned: workers must still read the first.
    let first = hub.publish("acme/ft-one", "main", &fixtures().join("models/ft1_sh"));
    let cache = tmp();
    let env = hub.env(&cache.path().join("hf"));
    let c = Cluster::new(Path::new("/"), env);
    let cfg = write_config(
        c.dir.path(),
        &config("acme/base", "acme/ft-one", "acme/ft-two"),
    );
    let out = tmp();
    let target = out.path().join("out");
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        target.to_str().unwrap(),
        &LAYOUT,
        "coordinator.log",
    );
    // The moved branch: different weights under the same names and shapes.
    let moved = tmp();
    copy_dir(&fixtures().join("models/ft2_sh"), moved.path());
    let second = hub.publish("acme/ft-one", "main", moved.path());
    assert_ne!(first, second);
    let mut workers = c.workers(2, &[]);
    assert_exit_ok(&mut coord, 120);
    for w in &mut workers {
        assert_exit_ok(w, 60);
    }
    let local = local_merge();
    assert_same_checkpoint(&target, &local.path().join("out"));
    assert!(
        !hub.requests().contains(&format!("/resolve/{second}/")),
        "a worker read the moved branch's commit"
    );
}

#[test]
fn hub_refusals_name_the_repo_and_what_to_do() {
    let hub = HubServer::start();
    publish_set(&hub);
    hub.publish("gated/base", "main", &fixtures().join("models/base_sh"));
    // A repo whose index lists a shard the commit does not have.
    let partial = tmp();
    copy_dir(&fixtures().join("models/ft1_sh"), partial.path());
    std::fs::remove_file(partial.path().join("model-00002-of-00002.safetensors")).unwrap();
    hub.publish("acme/partial", "main", partial.path());
    // A repo with PyTorch weights only.
    let bin = tmp();
    std::fs::write(bin.path().join("config.json"), b"{}").unwrap();
    std::fs::write(bin.path().join("pytorch_model.bin"), b"not really").unwrap();
    hub.publish("acme/old", "main", bin.path());

    let cache = tmp();
    let env = hub.env(&cache.path().join("hf"));
    let work = tmp();
    let cases: &[(&str, &[&str])] = &[
        (
            "gated/base",
            &["gated/base", "HF_TOKEN", "accept the conditions"],
        ),
        (
            "acme/nope",
            &["acme/nope", "no Hugging Face repo", "HF_TOKEN"],
        ),
        ("acme/base@v9", &["acme/base", "no revision `v9`"]),
        (
            "acme/partial",
            &[
                "model-00002-of-00002.safetensors",
                "listed in",
                "acme/partial",
            ],
        ),
        ("acme/old", &["acme/old", ".bin", "safetensors"]),
        (
            "not a/hub id",
            &["not a/hub id", "not a Hugging Face repo id"],
        ),
    ];
    for (base, wants) in cases {
        let cfg = write_config(work.path(), &config(base, "acme/ft-one", "acme/ft-two"));
        for cmd in ["plan", "merge"] {
            let out = work.path().join("out");
            let o = run_in(
                work.path(),
                &[cmd, cfg.to_str().unwrap(), out.to_str().unwrap()],
                &env,
            );
            let t = assert_exit(&o, 2);
            for w in *wants {
                assert!(t.contains(w), "{cmd} {base}: wanted `{w}` in:\n{t}");
            }
            assert!(!out.exists(), "{cmd} {base}: an output was written");
        }
    }
    // A Hub that cannot be reached: the repo and what to do, within the retry budget.
    let mut nowhere = env.clone();
    nowhere.push((
        "HF_ENDPOINT".into(),
        format!("http://127.0.0.1:{}", free_port()),
    ));
    nowhere.push(("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "2".into()));
    let cfg = write_config(
        work.path(),
        &config("acme/base", "acme/ft-one", "acme/ft-two"),
    );
    let o = run_in(work.path(), &["plan", cfg.to_str().unwrap()], &nowhere);
    let t = assert_exit(&o, 2);
    for w in [
        "cannot be reached",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "acme/",
    ] {
        assert!(t.contains(w), "wanted `{w}` in {t}");
    }
    // The gated repo with the token merges.
    let cfg = write_config(
        work.path(),
        &config("gated/base", "acme/ft-one", "acme/ft-two"),
    );
    let mut with_token = env.clone();
    with_token.push(("HF_TOKEN".into(), TOKEN.into()));
    let (out, _) = hub_merge(&cfg, &with_token, &[]);
    assert_same_checkpoint(&out.path().join("out"), &local_merge().path().join("out"));
    // A wrong token says it was refused.
    let mut wrong = env.clone();
    wrong.push(("HF_TOKEN".into(), "hf_wrong".into()));
    let o = run_in(work.path(), &["plan", cfg.to_str().unwrap()], &wrong);
    let t = assert_exit(&o, 2);
    assert!(t.contains("token was refused"), "{t}");
}

#[test]
fn a_429_burst_is_waited_out_and_a_redirect_to_another_host_gets_no_token() {
    let hub = HubServer::start();
    publish_set(&hub);
    // ft-two's files live on the CDN host: the token must not follow the redirect there
    // (the CDN answers 403 if it does).
    hub.mark("acme/ft-two", ".cdnhost", true);
    let cache = tmp();
    let mut env = hub.env(&cache.path().join("hf"));
    env.push(("HF_TOKEN".into(), TOKEN.into()));
    let work = tmp();
    let cfg = write_config(
        work.path(),
        &config("acme/base", "acme/ft-one", "acme/ft-two"),
    );
    // Every request for the base answers 429 (Retry-After: 1) for 2.5 s.
    hub.mark("acme/base", ".throttle", true);
    let lift = std::thread::spawn({
        let marker = hub.tree().join("acme/base/.throttle");
        move || {
            std::thread::sleep(Duration::from_millis(2500));
            std::fs::remove_file(marker).unwrap();
        }
    });
    let (out, _) = hub_merge(&cfg, &env, &[]);
    lift.join().unwrap();
    assert_same_checkpoint(&out.path().join("out"), &local_merge().path().join("out"));
    let log = hub.requests();
    assert!(log.contains("\" 429 "), "no 429 was served:\n{log}");
    assert!(log.contains("\" 302 "), "no redirect was served");
}

/// The Python with huggingface_hub that `.ci/run` installs (`MERGEFLEET_HF_PYTHON` to use
/// another).
fn hf_python() -> PathBuf {
    ci_venv("bin/python", "MERGEFLEET_HF_PYTHON", "huggingface_hub")
}

/// Fill `cache` from `hub` with the real huggingface_hub client, as mergekit would
/// (`snapshot_download` of the safetensors and JSON files).
fn fill_cache(hub: &HubServer, cache: &Path, repos: &[&str]) {
    let script = format!(
        "from huggingface_hub import snapshot_download\nfor r in {repos:?}:\n    print(snapshot_download(r, allow_patterns=['*.safetensors', '*.json']))\n"
    );
    let o = std::process::Command::new(hf_python())
        .args(["-c", &script])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_ENABLE_HF_TRANSFER", "0")
        .env("HF_HUB_DISABLE_XET", "1")
        .output()
        .expect("run python");
    assert!(o.status.success(), "snapshot_download: {}", text(&o));
}

#[test]
fn a_cache_filled_by_huggingface_hub_is_merged_offline_and_online_without_downloads() {
    let hub = HubServer::start();
    publish_set(&hub);
    let cache_dir = tmp();
    let cache = cache_dir.path().join("hf");
    let repos: Vec<&str> = SET.iter().map(|(r, _)| *r).collect();
    fill_cache(&hub, &cache, &repos);
    let env = hub.env(&cache);
    let work = tmp();
    let cfg = write_config(
        work.path(),
        &config("acme/base", "acme/ft-one", "acme/ft-two"),
    );
    let local = local_merge();

    // Online with the cache: the Hub is asked which commit `main` is, no file is fetched.
    let before = hub.requests().lines().count();
    let (out, _) = hub_merge(&cfg, &env, &[]);
    assert_same_checkpoint(&out.path().join("out"), &local.path().join("out"));
    let new: Vec<String> = hub
        .requests()
        .lines()
        .skip(before)
        .map(String::from)
        .collect();
    assert!(
        new.iter().all(|l| !l.contains("/resolve/")),
        "files were fetched although the cache has them:\n{}",
        new.join("\n")
    );
    assert!(
        new.iter().any(|l| l.contains("/api/models/")),
        "main was not pinned"
    );

    // --no-hf-cache reads the Hub.
    let before = hub.requests().lines().count();
    let (out, _) = hub_merge(&cfg, &env, &["--no-hf-cache"]);
    assert_same_checkpoint(&out.path().join("out"), &local.path().join("out"));
    assert!(hub
        .requests()
        .lines()
        .skip(before)
        .any(|l| l.contains("/resolve/") && l.contains(".safetensors")));

    // Naming a model twice, once by id and once by its cache snapshot, is refused.
    let snapshot = std::fs::read_dir(cache.join("models--acme--ft-one/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let twice = write_config(
        work.path(),
        &config("acme/base", "acme/ft-one", snapshot.to_str().unwrap()),
    );
    let o = run_in(work.path(), &["plan", twice.to_str().unwrap()], &env);
    let t = assert_exit(&o, 2);
    assert!(t.contains("listed twice"), "{t}");

    // Offline, with the server gone: the cache alone.
    drop(hub);
    let mut offline = env.clone();
    offline.push(("HF_HUB_OFFLINE".into(), "1".into()));
    let (out, _) = hub_merge(&cfg, &offline, &[]);
    assert_same_checkpoint(&out.path().join("out"), &local.path().join("out"));
    // A revision the cache does not have is named, with the repo and the cache.
    let missing = write_config(
        work.path(),
        &config("acme/base@v2", "acme/ft-one", "acme/ft-two"),
    );
    let o = run_in(work.path(), &["plan", missing.to_str().unwrap()], &offline);
    let t = assert_exit(&o, 2);
    for w in [
        "HF_HUB_OFFLINE",
        "acme/base",
        "@v2",
        cache.to_str().unwrap(),
    ] {
        assert!(t.contains(w), "wanted `{w}` in {t}");
    }
    // A file the cache lacks is named.
    let shard = std::fs::read_dir(cache.join("models--acme--ft-two/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let o = run_in(work.path(), &["plan", cfg.to_str().unwrap()], &offline);
    let t = assert_exit(&o, 2);
    assert!(
        t.contains("model-00002-of-00002.safetensors") && t.contains("acme/ft-two"),
        "{t}"
    );
}

/// What a published config does against stand-ins: merge, or exit 2 naming what a later
/// issue adds.
enum Outcome {
    Merges,
    Refused(&'static str),
}

/// Each real config of `tests/fixtures/configs` (verbatim, sources in SOURCES.md) against
/// stand-in models and adapters published under its Hub ids: those that merge (LoRA
/// adapters from the Hub included) give mergekit's tensors bit for bit, the rest are
/// refused naming the key or method not implemented yet.
const REAL: &[(&str, Outcome)] = &[
    ("01-halu-8b-llama3-blackroot.yml", Outcome::Merges),
    ("02-mistralsmall-creative-24b.yml", Outcome::Merges),
    ("03-haphazardv1-24b.yml", Outcome::Merges),
    ("04-nemodori-v0.1-12b-ms.yml", Outcome::Merges),
    ("05-mergekit-model-stock-uhzhsdi.yml", Outcome::Merges),
    ("06-mn-12b-siskin-test4b.yml", Outcome::Merges),
    ("07-mn-chinofun-12b-3.yml", Outcome::Merges),
    ("08-mn-sappho-j-12b.yml", Outcome::Merges),
    ("09-mn-funhouse-12b.yml", Outcome::Merges),
    ("10-mergekit-model-stock-aaxylhm.yml", Outcome::Merges),
    ("11-bestofllama3-8b-stock.yml", Outcome::Merges),
    ("12-1parammyl-8b-modelstock.yml", Outcome::Merges),
    ("13-llama-3.1-8b-athena-apollo-exp.yml", Outcome::Merges),
    ("14-weirdcompound-v1.6-24b-stage-a.yml", Outcome::Merges),
    ("15-neuralsynthesis-7b-v0.1.yml", Outcome::Merges),
    ("16-mn-hekate-filter-weights.yml", Outcome::Merges),
    ("17-huatuogpt-o1-8b-lora-stock.yml", Outcome::Merges),
    // Its base is not a source of its slice: mergekit refuses it too.
    (
        "18-mistral-ft-optimized-1218.yml",
        Outcome::Refused(
            "`slices[0]`: the base model `mistralai/Mistral-7B-v0.1` is not one of its sources",
        ),
    ),
    ("19-xwin-mlewd-13b-v0.2.yml", Outcome::Merges),
    // Its base is not a source of its slice: mergekit refuses it too.
    (
        "20-sauerkrautlm-una-solar-instruct.yml",
        Outcome::Refused(
            "`slices[0]`: the base model `upstage/SOLAR-10.7B-Instruct-v1.0` is not one of its sources",
        ),
    ),
    ("21-huatuoskywork-o1-llama-3.1-8b.yml", Outcome::Merges),
    ("22-gemma-moon-2-9b-it.yml", Outcome::Merges),
    ("23-silicon-maid-7b.yml", Outcome::Merges),
    ("24-llama-polyglot-13b.yml", Outcome::Merges),
    ("25-sonya-7b.yml", Outcome::Merges),
    ("26-neuralpipe-7b-ties.yml", Outcome::Merges),
    ("27-llama2-13b-psyfighter2.yml", Outcome::Merges),
    (
        "28-l3-umbral-mind-rp-v3.0-8b-task-arithmetic.yml",
        Outcome::Merges,
    ),
    (
        "29-l3-umbral-mind-rp-v3.0-8b-breadcrumbs-ties.yml",
        Outcome::Merges,
    ),
    ("30-mysticfusion-13b.yml", Outcome::Merges),
    // `model:` is older mergekit's spelling: mergekit 0.1.5 fails on it.
    (
        "31-miquliz-120b-v2.0.yml",
        Outcome::Refused("`tokenizer_source`: `model:152334H/miqu-1-70b-sf` is older mergekit's spelling"),
    ),
    // Its models are folders on the author's Windows machine.
    (
        "32-nemomix-unleashed-12b.yml",
        Outcome::Refused("is not a Hugging Face repo id"),
    ),
    // Its models are folders on the author's Windows machine.
    (
        "33-della-absa-german.yml",
        Outcome::Refused("is not a Hugging Face repo id"),
    ),
    (
        "34-bio-saul-dolphin-beagle-breadcrumbs.yml",
        Outcome::Merges,
    ),
    ("35-neuralpipe-9b-merged.yml", Outcome::Merges),
];

/// The ids of the `slices:` configs and of every config sharing an id with them.
fn deep_ids(dir: &Path, sources: &serde_json::Value) -> std::collections::BTreeSet<String> {
    let ids: Vec<(bool, Vec<String>)> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let sliced = std::fs::read_to_string(dir.join(e["file"].as_str().unwrap()))
                .unwrap()
                .contains("slices:");
            let ids = serde_json::from_value(e["hub_ids"].clone()).unwrap();
            (sliced, ids)
        })
        .collect();
    let mut deep = std::collections::BTreeSet::new();
    loop {
        let before = deep.len();
        for (sliced, list) in &ids {
            if *sliced || list.iter().any(|i| deep.contains(i)) {
                deep.extend(list.iter().cloned());
            }
        }
        if deep.len() == before {
            return deep;
        }
    }
}

/// A copy of stand-in model `src` at `to` with the tokenizer of its vocabulary size
/// (`tests/fixtures/configs/tokenizers`, as make_goldens.py there adds it), so the configs
/// that realign vocabularies find tokenizers on the Hub.
fn with_tokenizer(src: &Path, to: &Path) -> PathBuf {
    copy_dir(src, to);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let tok = root()
        .join("tests/fixtures/configs/tokenizers")
        .join(format!("v{}", cfg["vocab_size"]));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

/// The 80-layer stand-ins (`synth`: hidden 16, base + 3 fine-tunes), written once.
fn deep_set() -> &'static Path {
    static SET: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hub-deep-stand-ins");
        let done = dir.join("complete");
        if !done.exists() {
            let shape = mergefleet::synth::LlamaShape {
                hidden: 16,
                layers: 80,
                intermediate: 32,
                vocab: 64,
                heads: 2,
                kv_heads: 1,
                lm_head: true,
            };
            mergefleet::synth::write_set(&dir, &shape, 3, 1).unwrap();
            std::fs::write(&done, "").unwrap();
        }
        dir
    })
}

#[test]
fn real_configs_run_unchanged_against_stand_ins_on_the_hub() {
    let dir = root().join("tests/fixtures/configs");
    let sources: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sources.json")).unwrap()).unwrap();
    let files: Vec<&str> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, REAL.iter().map(|(f, _)| *f).collect::<Vec<_>>());
    // make_goldens.py there: mergekit's tensors for each config from the same stand-ins.
    let mergekit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("mergekit_sha256.json")).unwrap()).unwrap();
    let hub = HubServer::start();
    // Stand-ins: the golden fixtures' small bf16 models in turn, and for every id named
    // after a `+` a rank-8 PEFT adapter made for them (tests/fixtures/lora).
    let adapters: std::collections::BTreeSet<String> = REAL
        .iter()
        .flat_map(|(f, _)| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            text.split_whitespace()
                .filter_map(|w| w.split_once('+').map(|(_, a)| a.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let models = ["base", "ft1", "ft2", "ft3"].map(|m| fixtures().join("models").join(m));
    // The sliced configs reach layer 80: their ids, and those of the configs sharing an id
    // with them, get 80-layer stand-ins in the same turn (make_goldens.py does the same).
    let deep_models = ["base", "ft1", "ft2", "ft3"].map(|m| deep_set().join(m));
    let deep = deep_ids(&dir, &sources);
    let adapter = root().join("tests/fixtures/lora/adapters/bf16_r8");
    let staging = tmp();
    let mut published = std::collections::BTreeSet::new();
    for e in sources.as_array().unwrap() {
        for id in e["hub_ids"].as_array().unwrap() {
            let id = id.as_str().unwrap();
            if published.insert(id.to_string()) {
                let turn = if deep.contains(id) {
                    &deep_models
                } else {
                    &models
                };
                let src = if adapters.contains(id) {
                    adapter.clone()
                } else {
                    with_tokenizer(
                        &turn[published.len() % turn.len()],
                        &staging.path().join(id),
                    )
                };
                hub.publish(id, "main", &src);
            }
        }
    }
    let cache = tmp();
    let env = hub.env(&cache.path().join("hf"));
    let work = tmp();
    let mut merged = 0;
    for (file, outcome) in REAL {
        let cfg = dir.join(file);
        let out = work.path().join(file);
        let o = run_in(
            work.path(),
            &[
                "merge",
                cfg.to_str().unwrap(),
                out.to_str().unwrap(),
                "-q",
                "--random-seed",
                "0",
            ],
            &env,
        );
        match outcome {
            Outcome::Merges => {
                assert_exit(&o, 0);
                assert!(looks_complete(&out), "{file}");
                // What the real mergekit made of the same config from the same stand-ins.
                let want: BTreeMap<String, String> =
                    serde_json::from_value(mergekit[*file].clone())
                        .unwrap_or_else(|_| panic!("{file}: no mergekit golden"));
                crate::fidelity::assert_hashes(file, &want, &out);
                assert_eq!(
                    std::fs::read(out.join("mergekit_config.yml")).unwrap(),
                    std::fs::read(&cfg).unwrap(),
                    "{file}: the config is kept verbatim"
                );
                merged += 1;
            }
            Outcome::Refused(why) => {
                let t = assert_exit(&o, 2);
                assert!(t.contains(why), "{file}: wanted `{why}` in:\n{t}");
                assert!(!out.exists(), "{file}");
            }
        }
    }
    assert_eq!(merged, 30, "configs merged");
}
