//! The Kubernetes deployment in `deploy/`: every overlay is rendered with `kubectl kustomize`,
//! parsed into k8s-openapi types and checked against the rules the cluster relies on; then
//! the rendered containers are rehearsed: their command, args and environment run as local
//! processes against the S3 server on loopback, and the merge must equal embedded mode's.
//! (`.ci/run` also validates the same renderings with `kubernetes-validate --strict`.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mergefleet::args::{Cli, Command as Cmd};

use crate::util::*;

const OVERLAYS: &[&str] = &["aws-s3", "in-cluster-s3", "shared-volume"];

/// One rendered overlay, by kind and name.
#[derive(Default, Clone)]
struct Rendered {
    jobs: BTreeMap<String, Job>,
    config_maps: BTreeMap<String, ConfigMap>,
    secrets: BTreeMap<String, Secret>,
    services: BTreeMap<String, Service>,
    service_accounts: BTreeMap<String, ServiceAccount>,
    claims: BTreeMap<String, PersistentVolumeClaim>,
    /// The Prometheus operator's ServiceMonitors and PodMonitors, by name.
    monitors: BTreeMap<String, serde_yaml::Value>,
}

fn render(dir: &str) -> Rendered {
    render_path(&root().join("deploy/k8s").join(dir), dir)
}

fn render_path(path: &std::path::Path, dir: &str) -> Rendered {
    let out = Command::new("kubectl")
        .args(["kustomize", path.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): .ci/run installs it"));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        text(&out)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let mut r = Rendered::default();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml::Value, what: &str) -> T {
            serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{what}: {e}"))
        }
        let what = format!("{dir}: {kind} {name}");
        match kind.as_str() {
            "Job" => drop(r.jobs.insert(name, typed(v, &what))),
            "ConfigMap" => drop(r.config_maps.insert(name, typed(v, &what))),
            "Secret" => drop(r.secrets.insert(name, typed(v, &what))),
            "Service" => drop(r.services.insert(name, typed(v, &what))),
            "ServiceAccount" => drop(r.service_accounts.insert(name, typed(v, &what))),
            "PersistentVolumeClaim" => drop(r.claims.insert(name, typed(v, &what))),
            "ServiceMonitor" | "PodMonitor" => drop(r.monitors.insert(kind + "/" + &name, v)),
            other => panic!("{dir}: unexpected kind {other}: teach this test about it"),
        }
    }
    r
}

/// The labels and annotations of a Job's pods.
fn pod_meta(job: &Job) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    job.spec
        .as_ref()
        .and_then(|s| s.template.metadata.clone())
        .unwrap_or_default()
}

/// The Service whose selector picks pods with these labels.
fn service_for<'a>(
    r: &'a Rendered,
    pod_labels: &BTreeMap<String, String>,
) -> Option<(&'a String, &'a Service)> {
    r.services.iter().find(|(_, s)| {
        let sel = s
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    })
}

/// The Job whose pod runs a container named `component`, its pod spec and that container.
fn pod<'a>(r: &'a Rendered, component: &str) -> (&'a Job, &'a PodSpec, &'a Container) {
    let mut found = r.jobs.values().filter_map(|j| {
        let spec = j.spec.as_ref()?.template.spec.as_ref()?;
        let c = spec.containers.iter().find(|c| c.name == component)?;
        Some((j, spec, c))
    });
    let one = found.next().unwrap_or_else(|| panic!("no {component} Job"));
    assert!(found.next().is_none(), "two {component} Jobs");
    one
}

fn secret_value(s: &Secret, key: &str) -> Option<String> {
    if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    let b = s.data.as_ref()?.get(key)?;
    Some(String::from_utf8(b.0.clone()).unwrap())
}

fn secret_pairs(s: &Secret) -> Vec<(String, String)> {
    let mut keys: Vec<String> = Vec::new();
    keys.extend(s.data.iter().flat_map(|d| d.keys().cloned()));
    keys.extend(s.string_data.iter().flat_map(|d| d.keys().cloned()));
    keys.into_iter()
        .map(|k| (k.clone(), secret_value(s, &k).unwrap()))
        .collect()
}

/// A resource quantity as the downward API gives it with divisor 1: bytes for memory,
/// whole cores (rounded up) for cpu.
fn quantity(q: &str, resource: &str) -> String {
    let (num, suffix) = q.split_at(q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len()));
    let num: f64 = num.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => panic!("quantity suffix {other} in {q}"),
    };
    let v = num * scale;
    assert!(resource.ends_with("cpu") || resource.ends_with("memory"));
    format!("{}", v.ceil() as u64)
}

/// The environment the kubelet would give container `c` of `spec` (pod `pod_name`), or the
/// first reference that does not resolve. envFrom first; env entries override it.
fn container_env(
    r: &Rendered,
    spec: &PodSpec,
    c: &Container,
    pod_name: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        if let Some(cm) = &from.config_map_ref {
            let m = r.config_maps.get(&cm.name).ok_or(format!(
                "envFrom names ConfigMap {} that is not defined",
                cm.name
            ))?;
            env.extend(m.data.clone().unwrap_or_default());
        }
        if let Some(s) = &from.secret_ref {
            let s = r.secrets.get(&s.name).ok_or(format!(
                "envFrom names Secret {} that is not defined",
                s.name
            ))?;
            env.extend(secret_pairs(s));
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(src)) => {
                if let Some(k) = &src.config_map_key_ref {
                    r.config_maps
                        .get(&k.name)
                        .and_then(|m| m.data.as_ref()?.get(&k.key).cloned())
                        .ok_or(format!(
                            "{}: ConfigMap {} has no key {}",
                            e.name, k.name, k.key
                        ))?
                } else if let Some(k) = &src.secret_key_ref {
                    let found = r.secrets.get(&k.name).and_then(|s| secret_value(s, &k.key));
                    if found.is_none() && k.optional == Some(true) {
                        // As the kubelet does: an optional key that is absent sets nothing.
                        continue;
                    }
                    found.ok_or(format!(
                        "{}: Secret {} has no key {}",
                        e.name, k.name, k.key
                    ))?
                } else if let Some(f) = &src.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => pod_name.to_string(),
                        "metadata.labels['batch.kubernetes.io/controller-uid']" => {
                            "rehearsal-job-uid".to_string()
                        }
                        other => return Err(format!("{}: fieldRef {other} not rehearsed", e.name)),
                    }
                } else if let Some(f) = &src.resource_field_ref {
                    let owner = f.container_name.as_deref().unwrap_or(&c.name);
                    let owner = spec
                        .containers
                        .iter()
                        .find(|x| x.name == owner)
                        .ok_or(format!("{}: no container {owner}", e.name))?;
                    let (kind, res) = f.resource.split_once('.').unwrap();
                    let res_req = owner.resources.as_ref();
                    let table = match kind {
                        "limits" => res_req.and_then(|x| x.limits.as_ref()),
                        _ => res_req.and_then(|x| x.requests.as_ref()),
                    };
                    let q = table.and_then(|t| t.get(res)).ok_or(format!(
                        "{}: container {} sets no {}",
                        e.name, owner.name, f.resource
                    ))?;
                    quantity(&q.0, &f.resource)
                } else {
                    return Err(format!("{}: unsupported valueFrom", e.name));
                }
            }
            _ => return Err(format!("{}: needs exactly one of value, valueFrom", e.name)),
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

/// Kubernetes' `$(VAR)` expansion of command and args (`$$` escapes).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("$(") {
            let end = t.find(')').ok_or(format!("unclosed $( in {arg}"))?;
            let var = &t[..end];
            out.push_str(
                env.get(var)
                    .ok_or(format!("{arg}: $({var}) is not defined"))?,
            );
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_args(args: &[String]) -> Cmd {
    Cli::try_parse_from(std::iter::once("mergefleet".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{args:?} do not parse: {e}"))
        .command
}

/// The container's args with their variables expanded, as the kubelet runs them.
fn run_args(r: &Rendered, spec: &PodSpec, c: &Container, pod_name: &str) -> Vec<String> {
    let env = container_env(r, spec, c, pod_name).unwrap();
    let args: Vec<String> = c
        .command
        .iter()
        .flatten()
        .skip(1)
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    args.iter().map(|a| expand(a, &env).unwrap()).collect()
}

fn url_host_port(url: &str) -> (String, u16) {
    let u = url::Url::parse(url).unwrap();
    (
        u.host_str().unwrap().to_string(),
        u.port_or_known_default().unwrap(),
    )
}

/// The rules of the issue and of how mergefleet behaves, for one rendering.
fn check_rules(name: &str, r: &Rendered) {
    check_pods(name, r);
    let config = check_wiring(name, r);
    check_overlay(name, r, &config);
}

/// Both Jobs: lifetimes, identity, hardening, resources, where env and volumes come from.
fn check_pods(name: &str, r: &Rendered) {
    let ctx = |m: &str| format!("{name}: {m}");
    for (role, c_name) in [("coordinator", "coordinator"), ("workers", "worker")] {
        let (job, spec, c) = pod(r, c_name);
        let js = job.spec.as_ref().unwrap();
        assert!(
            js.ttl_seconds_after_finished.is_some(),
            "{}",
            ctx(&format!("{role}: ttlSecondsAfterFinished"))
        );
        assert!(
            js.backoff_limit.is_some(),
            "{}",
            ctx(&format!("{role}: backoffLimit"))
        );
        let sa = spec
            .service_account_name
            .as_deref()
            .unwrap_or_else(|| panic!("{}", ctx("serviceAccountName")));
        assert!(
            r.service_accounts.contains_key(sa),
            "{}",
            ctx(&format!("ServiceAccount {sa} not defined"))
        );
        // Security context: the pod's or the container's.
        let psc = spec.security_context.as_ref();
        let csc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{}", ctx("container securityContext")));
        assert!(
            csc.run_as_non_root.or(psc.and_then(|p| p.run_as_non_root)) == Some(true),
            "{}",
            ctx(&format!("{role}: runAsNonRoot"))
        );
        assert_eq!(
            csc.read_only_root_filesystem,
            Some(true),
            "{}",
            ctx("readOnlyRootFilesystem")
        );
        assert_eq!(
            csc.allow_privilege_escalation,
            Some(false),
            "{}",
            ctx("allowPrivilegeEscalation")
        );
        let drops = csc
            .capabilities
            .as_ref()
            .and_then(|x| x.drop.clone())
            .unwrap_or_default();
        assert!(
            drops.iter().any(|d| d == "ALL"),
            "{}",
            ctx("capabilities drop ALL")
        );
        let res = c
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{}", ctx("resources")));
        for table in [&res.requests, &res.limits] {
            let t = table
                .as_ref()
                .unwrap_or_else(|| panic!("{}", ctx("requests and limits")));
            assert!(
                t.contains_key("cpu") && t.contains_key("memory"),
                "{}",
                ctx("cpu and memory")
            );
        }
        // The binary is the image's entrypoint path.
        assert_eq!(
            c.command.as_deref(),
            Some(&["/usr/local/bin/mergefleet".to_string()][..]),
            "{}",
            ctx("command")
        );
        // Every variable it reads comes from something the manifests define.
        container_env(r, spec, c, "pod").unwrap_or_else(|e| panic!("{}", ctx(&e)));
        // Volumes name defined ConfigMaps and claims (ReadWriteMany: several nodes write).
        for v in spec.volumes.iter().flatten() {
            if let Some(cm) = &v.config_map {
                assert!(r.config_maps.contains_key(&cm.name), "{}", ctx(&cm.name));
            }
            if let Some(pvc) = &v.persistent_volume_claim {
                let claim = r
                    .claims
                    .get(&pvc.claim_name)
                    .unwrap_or_else(|| panic!("{}", ctx(&pvc.claim_name)));
                let modes = claim
                    .spec
                    .as_ref()
                    .and_then(|s| s.access_modes.clone())
                    .unwrap_or_default();
                assert!(
                    modes.iter().any(|m| m == "ReadWriteMany"),
                    "{}",
                    ctx("claim must be ReadWriteMany")
                );
            }
        }
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                spec.volumes.iter().flatten().any(|v| v.name == m.name),
                "{}",
                ctx(&m.name)
            );
        }
    }
}

/// How the pods fit together: the coordinator's Job, config, probes and Service, the
/// workers' Job, args, memory and liveness. Returns the merge config it runs.
fn check_wiring(name: &str, r: &Rendered) -> mergefleet::config::MergeConfig {
    let ctx = |m: &str| format!("{name}: {m}");
    // Coordinator: one pod, restarted in place on failure (it resumes from its journal).
    let (cjob, cspec, cc) = pod(r, "coordinator");
    let cjs = cjob.spec.as_ref().unwrap();
    assert_eq!(
        cspec.restart_policy.as_deref(),
        Some("OnFailure"),
        "{}",
        ctx("coordinator restartPolicy")
    );
    assert!(
        cjs.parallelism.unwrap_or(1) == 1 && cjs.completions.unwrap_or(1) == 1,
        "{}",
        ctx("one coordinator")
    );
    let Cmd::Coordinator(ca) = parse_args(&run_args(r, cspec, cc, "coordinator")) else {
        panic!(
            "{}",
            ctx("the coordinator container does not run `coordinator`")
        )
    };
    assert!(
        ca.token_file.is_some()
            || cc
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "MERGEFLEET_TOKEN"),
        "{}",
        ctx("token")
    );
    // The config it reads is a key of a mounted ConfigMap.
    let cfg = ca.config.to_str().unwrap();
    let mount = cc
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| cfg.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{}", ctx("the config is not in a mounted volume")));
    let vol = cspec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let cm = &r.config_maps[&vol.config_map.as_ref().unwrap().name];
    let key = &cfg[mount.mount_path.len() + 1..];
    let yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("{}", ctx(key)));
    let config = mergefleet::config::MergeConfig::from_yaml(yaml)
        .unwrap_or_else(|e| panic!("{}", ctx(&e.to_string())));
    // Probes: gRPC health on the port it listens on.
    let listen = ca.listen.port() as i32;
    for (what, p) in [
        ("startup", &cc.startup_probe),
        ("readiness", &cc.readiness_probe),
        ("liveness", &cc.liveness_probe),
    ] {
        let g = p
            .as_ref()
            .and_then(|p| p.grpc.as_ref())
            .unwrap_or_else(|| panic!("{}", ctx(&format!("coordinator {what} probe"))));
        assert_eq!(g.port, listen, "{}", ctx(what));
    }
    let cport = cc
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == listen)
        .unwrap_or_else(|| panic!("{}", ctx("containerPort")));

    // The Service in front of it.
    let pod_labels = pod_meta(cjob).labels.unwrap_or_default();
    let (svc_name, svc) = service_for(r, &pod_labels)
        .unwrap_or_else(|| panic!("{}", ctx("no Service selects the coordinator pod")));
    let ss = svc.spec.as_ref().unwrap();
    assert_eq!(
        ss.publish_not_ready_addresses,
        Some(true),
        "{}",
        ctx("publishNotReadyAddresses")
    );
    // The workers' selector must not also pick worker pods.
    let (wjob, wspec, wc) = pod(r, "worker");
    let wlabels = pod_meta(wjob).labels.unwrap_or_default();
    let sel = ss.selector.clone().unwrap();
    assert!(
        !sel.iter().all(|(k, v)| wlabels.get(k) == Some(v)),
        "{}",
        ctx("the Service also selects workers")
    );

    // Workers.
    let wjs = wjob.spec.as_ref().unwrap();
    assert_eq!(
        wjs.completion_mode.as_deref(),
        Some("Indexed"),
        "{}",
        ctx("completionMode")
    );
    assert!(
        wjs.completions.is_some() && wjs.completions == wjs.parallelism,
        "{}",
        ctx("completions = parallelism")
    );
    assert_eq!(
        wspec.restart_policy.as_deref(),
        Some("Never"),
        "{}",
        ctx("workers restartPolicy (podFailurePolicy needs Never)")
    );
    let rules = &wjs
        .pod_failure_policy
        .as_ref()
        .unwrap_or_else(|| panic!("{}", ctx("podFailurePolicy")))
        .rules;
    let fail_codes: Vec<i32> = rules
        .iter()
        .filter(|r| r.action == "FailJob")
        .filter_map(|r| r.on_exit_codes.as_ref())
        .filter(|e| e.operator == "In" && e.container_name.as_deref().is_none_or(|n| n == "worker"))
        .flat_map(|e| e.values.clone())
        .collect();
    for code in [2, 3] {
        assert!(
            fail_codes.contains(&code),
            "{}",
            ctx(&format!("exit code {code} must fail the Job, not retry"))
        );
    }
    let success = wjs
        .success_policy
        .as_ref()
        .unwrap_or_else(|| panic!("{}", ctx("successPolicy")));
    assert!(
        success.rules.iter().any(|r| r.succeeded_count == Some(1)),
        "{}",
        ctx("one worker's success ends the Job")
    );
    let Cmd::Worker(wa) = parse_args(&run_args(r, wspec, wc, "worker-0")) else {
        panic!("{}", ctx("the worker container does not run `worker`"))
    };
    let (host, port) = url_host_port(&wa.connect.coordinator);
    assert_eq!(&host, svc_name, "{}", ctx("workers' --coordinator host"));
    let sport = ss
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port as i32)
        .unwrap_or_else(|| panic!("{}", ctx("Service port")));
    let target_ok = match &sport.target_port {
        Some(IntOrString::Int(p)) => *p == listen,
        Some(IntOrString::String(n)) => cport.name.as_deref() == Some(n.as_str()),
        None => sport.port == listen,
    };
    assert!(
        target_ok,
        "{}",
        ctx("Service targetPort is not the coordinator's --listen port")
    );
    // --memory-limit comes from the worker container's own memory limit (downward API).
    let raw: Vec<&String> = wc.args.iter().flatten().collect();
    let mem_arg = raw
        .iter()
        .find_map(|a| a.strip_prefix("--memory-limit="))
        .unwrap_or_else(|| panic!("{}", ctx("worker --memory-limit=$(VAR)")));
    let var = mem_arg
        .strip_prefix("$(")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap();
    let src = wc
        .env
        .iter()
        .flatten()
        .find(|e| e.name == var)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.resource_field_ref.as_ref());
    let src =
        src.unwrap_or_else(|| panic!("{}", ctx("--memory-limit must come from resourceFieldRef")));
    assert_eq!(
        src.resource,
        "limits.memory",
        "{}",
        ctx("memory limit source")
    );
    assert_eq!(
        src.container_name.as_deref().unwrap_or("worker"),
        "worker",
        "{}",
        ctx("own container")
    );
    let limit = &wc.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0;
    assert_eq!(
        wa.memory_limit,
        Some(quantity(limit, "memory").parse().unwrap()),
        "{}",
        ctx("memory limit")
    );
    // Liveness asks the worker's own health endpoint, never the coordinator.
    let live = wc
        .liveness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .unwrap_or_else(|| panic!("{}", ctx("worker liveness")));
    let health = wa
        .health_listen
        .unwrap_or_else(|| panic!("{}", ctx("worker --health-listen")));
    assert_eq!(
        live.port,
        health.port() as i32,
        "{}",
        ctx("worker liveness port")
    );
    assert!(
        wc.readiness_probe.is_none(),
        "{}",
        ctx("workers serve nothing to be ready for")
    );

    // An unedited deployment must not run with its placeholder token.
    let token_ref = cc
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MERGEFLEET_TOKEN")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .unwrap();
    let token = secret_value(&r.secrets[&token_ref.name], &token_ref.key).unwrap();
    assert!(
        mergefleet::security::check_strength(&token).is_err(),
        "{}",
        ctx("the placeholder token would be accepted")
    );

    config
}

/// Each overlay's own promise.
fn check_overlay(name: &str, r: &Rendered, config: &mergefleet::config::MergeConfig) {
    let ctx = |m: &str| format!("{name}: {m}");
    let (_, cspec, cc) = pod(r, "coordinator");
    let (_, wspec, wc) = pod(r, "worker");
    let store_env = container_env(r, cspec, cc, "coordinator").unwrap();
    let output = expand("$(MERGEFLEET_OUTPUT)", &store_env).unwrap();
    let inputs: Vec<String> = config.all_models().map(|m| m.text.clone()).collect();
    match name {
        "aws-s3" => {
            let sa = &r.service_accounts[cspec.service_account_name.as_deref().unwrap()];
            let ann = sa.metadata.annotations.clone().unwrap_or_default();
            assert!(
                ann.get("eks.amazonaws.com/role-arn")
                    .is_some_and(|a| a.starts_with("arn:aws:iam::")),
                "{}",
                ctx("IRSA annotation")
            );
            assert!(
                store_env.contains_key("AWS_REGION") && !store_env.contains_key("AWS_ENDPOINT"),
                "{}",
                ctx("AWS store env")
            );
            assert!(
                output.starts_with("s3://") && inputs.iter().all(|m| m.starts_with("s3://")),
                "{}",
                ctx("S3 paths")
            );
        }
        "in-cluster-s3" => {
            assert!(
                store_env
                    .get("AWS_ENDPOINT")
                    .is_some_and(|e| e.starts_with("http://")),
                "{}",
                ctx("endpoint")
            );
            assert_eq!(
                store_env.get("AWS_ALLOW_HTTP").map(String::as_str),
                Some("true"),
                "{}",
                ctx("allow-http")
            );
            for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                assert!(store_env.contains_key(k), "{}", ctx(k));
            }
            assert!(
                output.starts_with("s3://") && inputs.iter().all(|m| m.starts_with("s3://")),
                "{}",
                ctx("S3 paths")
            );
        }
        "shared-volume" => {
            // Both pods mount the same claim at the same path, and the paths live there.
            let mount_of = |spec: &PodSpec, c: &Container| {
                let v = spec
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.persistent_volume_claim.is_some())
                    .unwrap();
                let m = c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == v.name)
                    .unwrap();
                (
                    v.persistent_volume_claim
                        .as_ref()
                        .unwrap()
                        .claim_name
                        .clone(),
                    m.mount_path.clone(),
                    m.read_only,
                )
            };
            let (cclaim, cpath, _) = mount_of(cspec, cc);
            let (wclaim, wpath, wro) = mount_of(wspec, wc);
            assert!(
                cclaim == wclaim && cpath == wpath && wro != Some(true),
                "{}",
                ctx("shared mount")
            );
            let under = format!("{cpath}/");
            assert!(
                output.starts_with(&under) && inputs.iter().all(|m| m.starts_with(&under)),
                "{}",
                ctx("paths on the volume")
            );
        }
        "base" => {}
        other => panic!("no rules for overlay {other}"),
    }
}

#[test]
fn k8s_manifests_follow_the_rules() {
    for overlay in OVERLAYS {
        check_rules(overlay, &render(&format!("overlays/{overlay}")));
    }
    check_rules("base", &render("base"));
}

#[test]
fn k8s_rules_catch_broken_manifests() {
    // The checks above can fail: break one rule at a time and watch them refuse.
    let good = render("overlays/in-cluster-s3");
    type Breaker = Box<dyn Fn(&mut Rendered)>;
    let breakers: Vec<(&str, Breaker)> = vec![
        (
            "completions = parallelism",
            Box::new(|r| {
                let j = r.jobs.get_mut("mergefleet-workers").unwrap();
                j.spec.as_mut().unwrap().parallelism = Some(2);
            }),
        ),
        (
            "is not defined",
            Box::new(|r| {
                let name = r
                    .config_maps
                    .keys()
                    .find(|k| k.starts_with("mergefleet-store"))
                    .unwrap()
                    .clone();
                r.config_maps.remove(&name);
            }),
        ),
        (
            "do not parse",
            Box::new(|r| {
                let j = r.jobs.get_mut("mergefleet-workers").unwrap();
                let c = &mut j
                    .spec
                    .as_mut()
                    .unwrap()
                    .template
                    .spec
                    .as_mut()
                    .unwrap()
                    .containers[0];
                c.args.as_mut().unwrap().push("--no-such-flag".into());
            }),
        ),
        (
            "exit code 2",
            Box::new(|r| {
                let j = r.jobs.get_mut("mergefleet-workers").unwrap();
                j.spec.as_mut().unwrap().pod_failure_policy = Some(Default::default());
            }),
        ),
        (
            "has no key",
            Box::new(|r| {
                let s = r.secrets.get_mut("mergefleet-token").unwrap();
                s.string_data = Some(BTreeMap::from([("tokn".to_string(), "x".to_string())]));
            }),
        ),
    ];
    for (want, brk) in breakers {
        let mut r = good.clone();
        brk(&mut r);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_rules("in-cluster-s3", &r)
        }))
        .expect_err(want);
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(msg.contains(want), "breaking `{want}` failed with: {msg}");
    }
}

#[test]
fn dockerfile_packages_the_tested_binary() {
    let d = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    // Built as CI builds it: the locked dependencies, default features, the one binary.
    assert!(
        d.contains("cargo build --release --locked --bin mergefleet"),
        "build command"
    );
    assert!(
        !d.contains("--features") && !d.contains("--all-features"),
        "features"
    );
    // Multi-stage, CA certificates for HTTPS stores, a numeric non-root user that the
    // manifests' runAsNonRoot can verify, and the path the manifests run.
    assert!(d.matches("\nFROM ").count() >= 2, "multi-stage");
    assert!(d.contains("ca-certificates"));
    assert!(d.contains("\nUSER 65532:65532\n"), "numeric non-root user");
    assert!(d.contains("COPY --from=build /mergefleet /usr/local/bin/mergefleet"));
    // The source build (the default: the last stage) and the packaged binary (`prebuilt`,
    // what CI runs in tests/image) share one runtime stage.
    let stages: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.contains(&"FROM runtime AS prebuilt"), "{stages:?}");
    assert_eq!(stages.last(), Some(&"FROM runtime AS image"), "{stages:?}");
    assert!(d.contains(r#"ENTRYPOINT ["/usr/local/bin/mergefleet"]"#));
    // Its toolchain is at least the crate's rust-version.
    let version = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    let arg = d
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        version(arg) >= version(msrv),
        "Dockerfile Rust {arg} < rust-version {msrv}"
    );
    // The uid the manifests run as is the image's.
    let r = render("base");
    for (_, spec, _) in [pod(&r, "coordinator"), pod(&r, "worker")] {
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_user,
            Some(65532)
        );
    }
    // The build context leaves out build output and history.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target") && ignore.lines().any(|l| l == ".git"));
}

/// Where a rehearsal puts what a pod would mount, and how it rewrites cluster addresses.
struct Rehearsal {
    dir: TempDir,
    /// Cluster path prefix -> local directory (ConfigMap volumes and claims).
    mounts: Vec<(String, PathBuf)>,
    /// Cluster address -> loopback address.
    addresses: Vec<(String, String)>,
}

impl Rehearsal {
    fn localize(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (from, to) in &self.addresses {
            s = s.replace(from, to);
        }
        for (from, to) in &self.mounts {
            s = s.replace(from, to.to_str().unwrap());
        }
        s
    }

    /// Make the pod's ConfigMap volumes and claims local directories (a claim is shared by
    /// every pod that mounts it, like a ReadWriteMany volume).
    fn mount(&mut self, r: &Rendered, spec: &PodSpec, c: &Container) {
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .unwrap();
            if let Some(cm) = &v.config_map {
                let local = self.dir.path().join(format!("configmap-{}", cm.name));
                std::fs::create_dir_all(&local).unwrap();
                self.mounts.push((m.mount_path.clone(), local));
            } else if let Some(pvc) = &v.persistent_volume_claim {
                let local = self.dir.path().join(format!("claim-{}", pvc.claim_name));
                std::fs::create_dir_all(&local).unwrap();
                self.mounts.push((m.mount_path.clone(), local));
            }
        }
        self.mounts.sort();
        self.mounts.dedup();
        // Longest first, so /data/x is mapped before /data.
        self.mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        // ConfigMap files are written after the mappings are known: their text may name
        // paths on a mounted volume.
        for m in c.volume_mounts.iter().flatten() {
            let v = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .unwrap();
            if let Some(cm) = &v.config_map {
                let local = self.dir.path().join(format!("configmap-{}", cm.name));
                for (k, text) in r.config_maps[&cm.name].data.iter().flatten() {
                    std::fs::write(local.join(k), self.localize(text)).unwrap();
                }
            }
        }
    }

    /// Start container `c` of `spec` as the kubelet would, with only the environment the
    /// manifests give it.
    fn start(&mut self, r: &Rendered, spec: &PodSpec, c: &Container, pod_name: &str) -> Proc {
        self.mount(r, spec, c);
        let env = container_env(r, spec, c, pod_name).unwrap();
        // Each pod has its own network namespace; here they share one, so any other
        // address a pod listens on gets a port of its own.
        let own_port = |a: String| match a.find("0.0.0.0:") {
            Some(i) => {
                let end = a[i + 8..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(a.len(), |e| i + 8 + e);
                format!("{}127.0.0.1:{}{}", &a[..i], free_port(), &a[end..])
            }
            None => a,
        };
        let args: Vec<String> = run_args(r, spec, c, pod_name)
            .iter()
            .map(|a| own_port(self.localize(a)))
            .collect();
        assert_eq!(c.command.as_ref().unwrap()[0], "/usr/local/bin/mergefleet");
        let mut cmd = Command::new(bin());
        cmd.args(&args).current_dir(self.dir.path()).env_clear();
        for (k, v) in &env {
            cmd.env(k, self.localize(v));
        }
        Proc::start(cmd, self.dir.path().join(format!("{pod_name}.log")))
    }
}

/// Render `overlay`, fill in what its user would (the token, the store's credentials and
/// endpoint), put models where its config says, run the coordinator and every worker
/// index as local processes, and return the merged checkpoint and the embedded one.
fn rehearse(overlay: &str, s3: &S3Server) -> (PathBuf, TempDir, Rehearsal) {
    let mut r = render(&format!("overlays/{overlay}"));
    let token = "rehearsal-token-0123456789abcdef".to_string();
    for s in r.secrets.values_mut() {
        let filled: BTreeMap<String, String> = secret_pairs(s)
            .into_iter()
            .map(|(k, _)| {
                let v = match k.as_str() {
                    "token" => token.clone(),
                    "AWS_ACCESS_KEY_ID" => ACCESS_KEY.to_string(),
                    "AWS_SECRET_ACCESS_KEY" => SECRET_KEY.to_string(),
                    other => panic!("the rehearsal cannot fill in secret key {other}"),
                };
                (k, v)
            })
            .collect();
        s.data = None;
        s.string_data = Some(filled);
    }
    let (_, cspec, cc) = pod(&r, "coordinator");
    let (wjob, wspec, wc) = pod(&r, "worker");
    let svc = r
        .services
        .iter()
        .find(|(n, _)| n.contains("coordinator"))
        .unwrap();
    let svc_port = svc.1.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    let port = free_port();
    let mut rh = Rehearsal {
        dir: tmp(),
        mounts: vec![],
        addresses: vec![
            (format!("{}:{svc_port}", svc.0), format!("127.0.0.1:{port}")),
            ("0.0.0.0:7300".into(), format!("127.0.0.1:{port}")),
        ],
    };
    // The store's address in the cluster becomes the S3 server's.
    let store_env = container_env(&r, cspec, cc, "coordinator").unwrap();
    if let Some(endpoint) = store_env.get("AWS_ENDPOINT") {
        rh.addresses
            .push((endpoint.clone(), format!("http://127.0.0.1:{}", s3.port)));
    }
    // Models where the config says (on the S3 server or the shared volume).
    rh.mount(&r, cspec, cc);
    let cfg_path = rh.localize("/etc/mergefleet/merge.yml");
    let config =
        mergefleet::config::MergeConfig::from_yaml(&std::fs::read_to_string(&cfg_path).unwrap())
            .unwrap();
    let shape = mergefleet::synth::LlamaShape::small();
    let place = |url: &str| -> PathBuf {
        match url.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, key) = rest.split_once('/').unwrap();
                s3.bucket(bucket).join(key)
            }
            None => PathBuf::from(url),
        }
    };
    for (i, m) in config.all_models().enumerate() {
        mergefleet::synth::write_model(&place(&m.text), &shape, i as u64, 2).unwrap();
    }
    let out_url = rh.localize(&store_env["MERGEFLEET_OUTPUT"]);
    if out_url.starts_with("s3://") {
        place(&out_url);
    }
    // The embedded merge of the same config, for comparison.
    let embedded = tmp();
    let mut env = store_env.clone();
    env.retain(|k, _| k.starts_with("AWS_"));
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.clone(), rh.localize(v)))
        .collect();
    assert_ok(&run_in(
        rh.dir.path(),
        &["merge", &cfg_path, embedded.path().to_str().unwrap(), "-q"],
        &env,
    ));

    let mut coord = rh.start(&r, cspec, cc, "mergefleet-coordinator-rehearsal");
    let n = wjob.spec.as_ref().unwrap().completions.unwrap();
    let mut workers: Vec<Proc> = (0..n)
        .map(|i| rh.start(&r, wspec, wc, &format!("mergefleet-workers-{i}-rehearsal")))
        .collect();
    assert_exit_ok(&mut coord, 180);
    for w in &mut workers {
        assert_exit_ok(w, 60);
    }
    assert!(coord.log().contains("committed"), "{}", coord.log());
    assert!(!coord.log().contains(&token), "the token was logged");
    (place(&out_url), embedded, rh)
}

#[test]
fn k8s_rehearsal_in_cluster_s3() {
    let s3 = S3Server::start();
    let (out, embedded, _rh) = rehearse("in-cluster-s3", &s3);
    assert!(
        looks_complete(&out),
        "no complete checkpoint at {}",
        out.display()
    );
    assert_same_checkpoint(&out, embedded.path());
}

#[test]
fn k8s_rehearsal_shared_volume() {
    let s3 = S3Server::start();
    let (out, embedded, rh) = rehearse("shared-volume", &s3);
    assert!(
        out.starts_with(rh.dir.path()),
        "{} is not on the volume",
        out.display()
    );
    assert!(
        looks_complete(&out),
        "no complete checkpoint at {}",
        out.display()
    );
    assert_same_checkpoint(&out, embedded.path());
}

/// Metrics as deployed: each pod's `--metrics-listen` port is its container port named
/// `metrics` and the port its scrape annotations give; the coordinator's Service exposes it;
/// and the Prometheus operator component (added to each overlay) selects exactly these.
#[test]
fn metrics_ports_annotations_and_monitors_agree() {
    for overlay in OVERLAYS {
        let ctx = |m: &str| format!("{overlay}: {m}");
        // The overlay with the component, as a user would write it.
        let dir = tmp();
        // Kustomize takes only relative roots: climb from the temporary folder to `/`.
        let up = "../".repeat(dir.path().components().count() - 1);
        let k8s = PathBuf::from(up).join(root().join("deploy/k8s").strip_prefix("/").unwrap());
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
                k8s.join("overlays").join(overlay).display(),
                k8s.join("components/prometheus-operator").display()
            ),
        )
        .unwrap();
        let r = render_path(dir.path(), overlay);
        for component in ["coordinator", "worker"] {
            let (job, spec, c) = pod(&r, component);
            let addr = match parse_args(&run_args(&r, spec, c, &format!("{component}-0"))) {
                Cmd::Coordinator(a) => a.metrics_listen,
                Cmd::Worker(a) => a.metrics_listen,
                _ => unreachable!(),
            }
            .unwrap_or_else(|| panic!("{}", ctx(&format!("{component} --metrics-listen"))));
            let port = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("metrics"))
                .unwrap_or_else(|| panic!("{}", ctx(&format!("{component} port named metrics"))));
            assert_eq!(
                port.container_port,
                addr.port() as i32,
                "{}",
                ctx(component)
            );
            let meta = pod_meta(job);
            let notes = meta.annotations.clone().unwrap_or_default();
            assert_eq!(
                notes.get("prometheus.io/scrape").map(String::as_str),
                Some("true"),
                "{}",
                ctx(component)
            );
            assert_eq!(
                notes.get("prometheus.io/port"),
                Some(&addr.port().to_string()),
                "{}",
                ctx(component)
            );
            assert_eq!(
                notes.get("prometheus.io/path").map(String::as_str),
                Some("/metrics"),
                "{}",
                ctx(component)
            );
            let labels = meta.labels.clone().unwrap_or_default();
            let selects = |sel: &serde_yaml::Value, on: &BTreeMap<String, String>| {
                let want = sel["matchLabels"].as_mapping().expect("matchLabels");
                !want.is_empty()
                    && want
                        .iter()
                        .all(|(k, v)| on.get(k.as_str().unwrap()).map(String::as_str) == v.as_str())
            };
            if component == "worker" {
                let m = &r.monitors["PodMonitor/mergefleet-workers"];
                assert!(
                    selects(&m["spec"]["selector"], &labels),
                    "{}",
                    ctx("PodMonitor selects the workers")
                );
                assert_eq!(
                    m["spec"]["podMetricsEndpoints"][0]["port"].as_str(),
                    Some("metrics")
                );
            } else {
                let (_, svc) = service_for(&r, &labels)
                    .unwrap_or_else(|| panic!("{}", ctx("no Service selects the coordinator")));
                let sspec = svc.spec.as_ref().unwrap();
                let sport = sspec
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some("metrics"))
                    .unwrap_or_else(|| panic!("{}", ctx("Service port named metrics")));
                assert_eq!(
                    sport.target_port,
                    Some(IntOrString::String("metrics".into())),
                    "{}",
                    ctx("Service targetPort")
                );
                let m = &r.monitors["ServiceMonitor/mergefleet-coordinator"];
                let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
                assert!(
                    selects(&m["spec"]["selector"], &svc_labels),
                    "{}",
                    ctx("ServiceMonitor selects the Service")
                );
                assert_eq!(m["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
            }
        }
    }
}
