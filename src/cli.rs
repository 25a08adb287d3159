//! Command-line interface: argument parsing and the human-facing output of each command.
//! The only place besides `main` that prints; `anyhow` is used here, at the binary's edge.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use mergefleet::embedded::{merge, MergeOptions};
use mergefleet::job::Job;
use mergefleet::plan::PlanOptions;
use mergefleet::source::Stores;
use mergefleet::units::{default_memory_limit, fmt_bytes, parse_size, peak_rss};

#[derive(Parser, Debug)]
#[command(
    name = "mergefleet",
    version,
    about = "Merge large language models with mergekit's model_stock, on one machine or a fleet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Merge in this process: read the models, write the merged checkpoint to OUT.
    Merge(MergeArgs),
    /// Read only the headers, check everything, and print what a merge would do.
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
pub struct ShardArgs {
    /// Largest output file, in bytes of tensor data (decimal K/M/B suffixes: 5B = 5e9).
    #[arg(long, default_value = "5B", value_parser = parse_size)]
    pub out_shard_size: u64,
    /// Target bytes read per task (bigger tensors are a task of their own).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub task_size: u64,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// Output directory or object-store URL (s3://bucket/prefix, gs://, az://, file://).
    pub out: String,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Bound on the merge's working memory (default: half of physical memory).
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Do not copy the base model's tokenizer files.
    #[arg(long)]
    pub no_copy_tokenizer: bool,
    /// Do not write a README.md model card.
    #[arg(long)]
    pub no_model_card: bool,
    /// Replace a complete checkpoint already at OUT.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

fn read_config(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        mergefleet::Error::Usage(format!("cannot read the config {}: {e}", path.display())).into()
    })
}

pub fn threads(args: &Command) -> usize {
    let n = match args {
        Command::Merge(m) => m.threads,
        Command::Plan(_) => None,
    };
    cli_threads(n)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Merge(a) => {
            let yaml = read_config(&a.config)?;
            let threads = cli_threads(a.threads);
            let opts = MergeOptions {
                plan: PlanOptions {
                    out_shard_size: a.shard.out_shard_size,
                    task_size: a.shard.task_size,
                },
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
            Ok(())
        }
        Command::Plan(a) => {
            let yaml = read_config(&a.config)?;
            let opts = PlanOptions {
                out_shard_size: a.shard.out_shard_size,
                task_size: a.shard.task_size,
            };
            let job = Job::load(&yaml, &Stores::new(), opts).await?;
            print_plan(&job, a.json);
            Ok(())
        }
    }
}

fn print_plan(job: &Job, as_json: bool) {
    let p = &job.plan;
    let largest = p.largest_tensor();
    let need = largest.map(mergefleet::exec::min_memory).unwrap_or(0);
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
            .flat_map(|t| &t.tensors)
            .map(|t| json!({"name": t.name, "shape": t.shape, "dtype": format!("{:?}", t.dtype), "file": p.files[p.tasks.iter().find(|k| k.tensors.iter().any(|x| x.name == t.name)).map(|k| k.file).unwrap_or(0)].name, "merge": matches!(t.op, mergefleet::plan::Op::Merge{..})}))
            .collect();
        let v = json!({
            "base_model": job.config.base_model.0,
            "models": job.config.models.iter().map(|m| &m.0).collect::<Vec<_>>(),
            "tensors": tensors,
            "files": files,
            "tasks": p.tasks.len(),
            "bytes_read": p.bytes_read(),
            "bytes_written": p.bytes_written(),
            "largest_tensor": largest.map(|t| json!({"name": t.name, "shape": t.shape, "one_pass_memory": one_pass})),
            "min_memory": need,
            "warnings": p.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return;
    }
    println!("base model: {}", job.config.base_model);
    for m in &job.config.models {
        println!("fine-tune:  {m}");
    }
    println!();
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
    for w in &p.warnings {
        println!("warning: {w}");
    }
}

fn cli_threads(n: Option<usize>) -> usize {
    n.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
    .max(1)
}
