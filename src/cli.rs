//! Runs the commands the user gave (their grammar is `mergefleet::args`) and prints what
//! they did. The only place besides `main` that prints; `anyhow` is used here, at the edge.

use std::path::PathBuf;

use serde_json::json;

use mergefleet::args::{Cli, Command, CoordinatorArgs, MergeArgs, WorkerArgs};
use mergefleet::embedded::{merge, MergeOptions};
use mergefleet::job::Job;
use mergefleet::memory::{default_memory_limit, peak_rss, task_budget};
use mergefleet::store::Stores;
use mergefleet::units::{self, fmt_bytes};

fn read_config(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        mergefleet::Error::ReadFile {
            path: format!("the config {}", path.display()),
            source,
        }
        .into()
    })
}

/// Compute threads for this command; more than the cores only costs start-up time (5,000
/// took 26 s to start for a 0.3 s merge), so they are capped at the cores, with a warning.
pub fn threads(args: &Command) -> usize {
    let n = match args {
        Command::Merge(m) => m.threads,
        Command::Worker(w) => w.threads,
        _ => None,
    };
    let used = cli_threads(n);
    if let Some(asked) = n.filter(|&n| n > used) {
        tracing::warn!(
            "--threads {asked} is more than the {used} cores this process may use: using {used}"
        );
    }
    used
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    mergefleet::hub::configure(!cli.no_hf_cache);
    // MKL's float32 acos/sin/cos, when the environment names it: refused now if unusable.
    if mergefleet::merge::vml::init().map_err(|e| mergefleet::Error::Usage(e.to_string()))? {
        tracing::info!(
            "float32 acos/sin/cos from MKL ({})",
            mergefleet::merge::vml::ENV
        );
    }
    match cli.command {
        Command::Merge(a) => run_merge(a).await,
        Command::Coordinator(a) => run_coordinator(a).await,
        Command::Worker(a) => run_worker(a).await,
        Command::Status(a) => {
            let c = &a.connect;
            let s = mergefleet::worker::status(
                &c.coordinator,
                c.token()?.as_deref(),
                c.tls_ca.as_deref(),
            )
            .await?;
            print_status(&s, a.json);
            Ok(())
        }
        Command::Plan(a) => {
            let yaml = read_config(&a.config)?;
            let opts = a.shard.options();
            let stores = Stores::new();
            let job = Job::load(&yaml, &stores, opts).await?;
            let output = match &a.out {
                Some(out) => Some(plan_output(&job, &stores, out).await?),
                None => None,
            };
            print_plan(&job, output.as_ref(), a.json);
            Ok(())
        }
    }
}

async fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    mergefleet::store::configure_reads(a.read.parts());
    let yaml = read_config(&a.config)?;
    let threads = cli_threads(a.threads);
    let opts = MergeOptions {
        plan: a.shard.options(),
        memory_limit: a.memory_limit.unwrap_or_else(default_memory_limit),
        depth: threads + 2,
        copy_tokenizer: !a.no_copy_tokenizer,
        model_card: !a.no_model_card,
        overwrite: a.overwrite,
        quiet: a.quiet,
    };
    let s = merge(&yaml, &a.out, &opts).await?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "merged {} tensors into {} file(s) at {}: read {}, wrote {} in {:.2} s ({:.2} GB/s of input), peak RSS {}",
        s.tensors,
        s.files,
        s.output,
        fmt_bytes(s.bytes_read),
        fmt_bytes(s.bytes_written),
        s.seconds,
        s.bytes_read as f64 / s.seconds / 1e9,
        peak_rss().map(fmt_bytes).unwrap_or_else(|| "unknown".into())
    );
    print_aborted(s.uploads_aborted, &s.output);
    Ok(())
}

fn print_aborted(n: usize, output: &str) {
    if n > 0 {
        println!("aborted {n} incomplete upload(s) an earlier merge left under {output}");
    }
}

async fn run_coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let yaml = read_config(&a.config)?;
    let token = mergefleet::security::load_token(a.token_file.as_deref())
        .map_err(mergefleet::Error::Usage)?;
    let opts = mergefleet::coordinator::CoordinatorOptions {
        listen: a.listen,
        token,
        insecure: a.insecure,
        tls: a.tls_cert.zip(a.tls_key),
        plan: a.shard.options_for(&yaml, &a.out),
        max_attempts: a.max_attempts,
        lease_timeout: a.lease_timeout,
        restart: a.restart,
        overwrite: a.overwrite,
        copy_tokenizer: !a.no_copy_tokenizer,
        model_card: !a.no_model_card,
        linger: a.linger,
        metrics_listen: a.metrics_listen,
    };
    let s = mergefleet::coordinator::run(&yaml, &a.out, opts).await?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if s.already_committed {
        println!(
            "{} already holds this merge's committed checkpoint ({} tensors, {} tasks): nothing to do",
            s.output, s.tensors, s.tasks
        );
        return Ok(());
    }
    println!(
        "committed {} tensors ({} tasks, {} resumed from the journal) at {}: wrote {} in {:.2} s; {:.3} s from the last task to the commit",
        s.tensors,
        s.tasks,
        s.resumed,
        s.output,
        fmt_bytes(s.bytes_written),
        s.seconds,
        s.commit_seconds
    );
    print_aborted(s.uploads_aborted, &s.output);
    Ok(())
}

async fn run_worker(a: WorkerArgs) -> anyhow::Result<()> {
    mergefleet::store::configure_reads(a.read.parts());
    let token = a.connect.token()?;
    let name = a.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("worker-{}", std::process::id()))
    });
    let opts = mergefleet::worker::WorkerOptions {
        coordinator: a.connect.coordinator,
        token,
        tls_ca: a.connect.tls_ca,
        memory_limit: a
            .memory_limit
            .map(task_budget)
            .unwrap_or_else(default_memory_limit),
        threads: cli_threads(a.threads) as u32,
        name,
        retry_for: a.retry_for,
        health_listen: a.health_listen,
        metrics_listen: a.metrics_listen,
    };
    let s = mergefleet::worker::run(opts, a.tasks_in_flight).await?;
    println!("worker finished: {} task(s) ran here", s.tasks_done);
    Ok(())
}

/// What `plan` finds at the output a merge would write.
struct PlanOutput {
    location: String,
    /// Incomplete uploads earlier merges recorded there (a merge aborts them).
    uploads: usize,
}

/// Check `out` as `merge` does before it takes it (not inside an input, bucket and
/// credentials usable), and count the uploads a merge there would abort. Changes nothing.
async fn plan_output(job: &Job, stores: &Stores, out: &str) -> anyhow::Result<PlanOutput> {
    let location = stores.resolve(out).map_err(mergefleet::Error::from)?;
    job.check_output(&location)
        .map_err(mergefleet::Error::from)?;
    mergefleet::sink::Sink::check(&location, true)
        .await
        .map_err(mergefleet::Error::from)?;
    let uploads = mergefleet::sink::uploads::recorded(&location)
        .await
        .map_err(mergefleet::Error::from)?
        .len();
    Ok(PlanOutput {
        location: location.display,
        uploads,
    })
}

fn print_plan(job: &Job, output: Option<&PlanOutput>, as_json: bool) {
    let p = &job.plan;
    let largest = p.largest_tensor();
    let need = largest
        .map(mergefleet::plan::TensorJob::min_memory)
        .unwrap_or(0);
    let one_pass = largest.map(|t| t.working_set()).unwrap_or(0);
    if as_json {
        let files: Vec<_> = p
            .files
            .iter()
            .map(|f| {
                let tensors: usize = p.tasks[f.tasks.clone()]
                    .iter()
                    .map(|t| t.tensors.len())
                    .sum();
                json!({"name": f.name, "bytes": f.size, "tensors": tensors, "tasks": f.tasks.len()})
            })
            .collect();
        let tensors: Vec<_> = p
            .tasks
            .iter()
            .flat_map(|task| {
                task.tensors
                    .iter()
                    .map(move |t| (t, &p.files[task.file].name))
            })
            .map(|(t, file)| {
                let params = match &t.op {
                    mergefleet::plan::Op::Merge { kernel, .. } => serde_json::Value::Object(
                        kernel
                            .method
                            .values()
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    ),
                    mergefleet::plan::Op::Copy { .. } => serde_json::Value::Null,
                };
                json!({
                    "name": t.name,
                    "shape": t.shape,
                    "dtype": format!("{:?}", t.dtype),
                    "file": file,
                    "merge": matches!(t.op, mergefleet::plan::Op::Merge { .. }),
                    "parameters": params,
                })
            })
            .collect();
        let v = json!({
            "merge_method": job.config.method.name(),
            "base_model": job.config.base_model.as_ref().map(|b| &b.text),
            "models": job.config.models.iter().map(|m| &m.text).collect::<Vec<_>>(),
            "layers": layers_json(job),
            "vocabulary": vocab_json(job),
            "tensors": tensors,
            "files": files,
            "tasks": p.tasks.len(),
            "bytes_read": p.bytes_read(),
            "bytes_written": p.bytes_written(),
            "largest_tensor": largest.map(|t| json!({"name": t.name, "shape": t.shape, "one_pass_memory": one_pass})),
            "min_memory": need,
            "fp8_inputs_dequantized": p.fp8_inputs(),
            "output": output.map(|o| json!({"location": o.location, "incomplete_uploads_to_abort": o.uploads})),
            "warnings": p.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    println!("merge method: {}", job.config.method.name());
    if let Some(b) = &job.config.base_model {
        println!("base model:   {b}");
    }
    for m in &job.config.models {
        println!("model:        {m}");
    }
    println!();
    print_layer_map(job);
    print_vocabulary(job);
    print_parameter_groups(p);
    for t in p.tasks.iter().flat_map(|t| &t.tensors) {
        let how = match t.op {
            mergefleet::plan::Op::Merge { .. } => "merge",
            mergefleet::plan::Op::Copy { .. } => "copy",
        };
        println!(
            "  {:<60} {:>20} {:?} {how}",
            t.name,
            format!("{:?}", t.shape),
            t.dtype
        );
    }
    println!();
    for f in &p.files {
        println!("output file {} ({})", f.name, fmt_bytes(f.size));
    }
    println!();
    println!("tensors:        {}", p.tensor_count());
    let fp8 = p.fp8_inputs();
    if fp8 > 0 {
        println!(
            "FP8 inputs:     {fp8} block-FP8 weight(s) read with their scales and dequantized to bfloat16"
        );
    }
    let whole = p
        .tasks
        .iter()
        .flat_map(|t| &t.tensors)
        .filter(|t| t.whole())
        .count();
    if whole > 0 {
        println!(
            "streaming:      {} merges {whole} tensor(s) as whole tensors, never in windows ({})",
            job.config.method.name(),
            if job.vocab.is_some() {
                "realigned vocabulary rows, or a method whose output elements depend on the whole tensor"
            } else {
                "each output element depends on the whole tensor"
            }
        );
    }
    println!("tasks:          {}", p.tasks.len());
    println!(
        "bytes to read:  {} ({} B)",
        fmt_bytes(p.bytes_read()),
        p.bytes_read()
    );
    println!(
        "bytes to write: {} ({} B)",
        fmt_bytes(p.bytes_written()),
        p.bytes_written()
    );
    if let Some(t) = largest {
        println!(
            "largest tensor: {} {:?}: {} to merge in one pass; at least {} when streamed",
            t.name,
            t.shape,
            fmt_bytes(one_pass),
            fmt_bytes(need)
        );
    }
    if let Some(o) = output {
        println!(
            "output:         {} ({} incomplete upload(s) of earlier merges recorded there; a merge aborts them, a resumed coordinator keeps its own)",
            o.location, o.uploads
        );
    }
    for w in &p.warnings {
        println!("warning: {w}");
    }
}

/// A merged vocabulary: its size, which model each token comes from first, and the tokens
/// no model has.
fn print_vocabulary(job: &Job) {
    let Some(v) = &job.vocab else { return };
    let models: Vec<&mergefleet::config::ModelRef> = job.config.all_models().collect();
    let (counts, none) = v.origins();
    let padded = if v.padded > v.size() {
        format!(", {} rows with padding", v.padded)
    } else {
        String::new()
    };
    println!("vocabulary ({}): {} tokens{padded}", v.spec.key, v.size());
    for (m, n) in counts.iter().enumerate() {
        if *n > 0 {
            println!("  {n:>8} from `{}`", models[m]);
        }
    }
    if !none.is_empty() {
        println!(
            "  {:>8} no model has: {}",
            none.len(),
            none.iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!();
}

fn vocab_json(job: &Job) -> serde_json::Value {
    let Some(v) = &job.vocab else {
        return serde_json::Value::Null;
    };
    let models: Vec<&mergefleet::config::ModelRef> = job.config.all_models().collect();
    let (counts, none) = v.origins();
    json!({
        "size": v.size(),
        "padded": v.padded,
        "from": counts.iter().enumerate().map(|(m, n)| json!({"model": models[m].text, "tokens": n})).collect::<Vec<_>>(),
        "in_no_model": none,
    })
}

/// A sliced merge's output layers, one line per slice: which layers of which models.
fn print_layer_map(job: &Job) {
    let models: Vec<&mergefleet::config::ModelRef> = job.config.all_models().collect();
    let mut k = 0;
    if job.plan.layers.is_empty() {
        return;
    }
    println!("output layers (slices):");
    for (s, slice) in job.config.slices.iter().enumerate() {
        let n = slice.len();
        let sources: Vec<String> = slice
            .sources
            .iter()
            .map(|src| {
                format!(
                    "`{}` layers {}..{}",
                    models[src.model], src.layers.start, src.layers.end
                )
            })
            .collect();
        let span = match n {
            0 => "(none)".to_string(),
            1 => format!("{k}"),
            _ => format!("{k}..{}", k + n),
        };
        println!("  {span:<10} slice {s}: {}", sources.join(" + "));
        k += n;
    }
    println!();
}

fn layers_json(job: &Job) -> serde_json::Value {
    let models: Vec<&mergefleet::config::ModelRef> = job.config.all_models().collect();
    job.plan
        .layers
        .iter()
        .enumerate()
        .map(|(k, l)| {
            json!({
                "output": k,
                "slice": l.slice,
                "sources": l.sources.iter().map(|(m, layer)| json!({"model": models[*m].text, "layer": layer})).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// The resolved parameters, one line per run of tensors (in name order) that share them.
fn print_parameter_groups(p: &mergefleet::plan::MergePlan) {
    let mut merged: Vec<(&str, String)> = p
        .tasks
        .iter()
        .flat_map(|t| &t.tensors)
        .filter_map(|t| match &t.op {
            mergefleet::plan::Op::Merge { kernel, .. } => {
                Some((t.name.as_str(), kernel.method.describe()))
            }
            mergefleet::plan::Op::Copy { .. } => None,
        })
        .collect();
    merged.sort();
    println!("parameters (per tensor, resolved):");
    let mut i = 0;
    while i < merged.len() {
        let run = merged[i..]
            .iter()
            .take_while(|(_, d)| *d == merged[i].1)
            .count();
        let (first, last) = (merged[i].0, merged[i + run - 1].0);
        let span = if run == 1 {
            first.to_string()
        } else {
            format!("{first} .. {last} ({run} tensors)")
        };
        println!("  {span}: {}", merged[i].1);
        i += run;
    }
    println!();
}

fn cli_threads(n: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    n.unwrap_or(cores).clamp(1, cores)
}

fn print_status(s: &mergefleet::wire::StatusReport, as_json: bool) {
    let (rate, eta) = units::rate_and_eta(s.bytes_done, s.bytes_total, s.elapsed_s);
    if as_json {
        let workers: Vec<_> = s
            .workers
            .iter()
            .map(|w| json!({"id": w.worker.0, "name": w.name, "last_heartbeat_s_ago": w.last_heartbeat_s_ago, "task": w.task.map_or(-1, |t| t.0 as i64), "tasks_done": w.tasks_done}))
            .collect();
        let v = json!({
            "state": s.state, "output": s.output,
            "tasks": {"total": s.tasks_total, "done": s.tasks_done, "running": s.tasks_running, "pending": s.tasks_pending},
            "bytes": {"total": s.bytes_total, "done": s.bytes_done},
            "rate_bytes_per_s": rate, "eta_s": eta, "elapsed_s": s.elapsed_s, "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    println!("state:   {}", s.state);
    println!("output:  {}", s.output);
    println!(
        "tasks:   {} done, {} running, {} pending (of {})",
        s.tasks_done, s.tasks_running, s.tasks_pending, s.tasks_total
    );
    println!(
        "bytes:   {} of {} ({}/s, ETA {}, {:.0} s elapsed)",
        fmt_bytes(s.bytes_done),
        fmt_bytes(s.bytes_total),
        fmt_bytes(rate as u64),
        units::fmt_eta(eta),
        s.elapsed_s
    );
    println!("workers: {}", s.workers.len());
    for w in &s.workers {
        let task = match w.task {
            None => "idle".to_string(),
            Some(t) => format!("task {t}"),
        };
        println!(
            "  {:<24} id {:<20} last heartbeat {:>5.1} s ago  {:<10} {} done",
            w.name, w.worker, w.last_heartbeat_s_ago, task, w.tasks_done
        );
    }
}
