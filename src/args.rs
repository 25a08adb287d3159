//! The command line's grammar: every command, flag and default, as clap types.
//!
//! Kept in the library, apart from the code that runs the commands (`src/cli.rs` in the
//! binary), so tests can check that the argument lists in our Kubernetes manifests parse
//! exactly as the binary would parse them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::merge::Reductions;
use crate::plan::PlanOptions;
use crate::units::{parse_duration, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "mergefleet",
    version,
    about = "Merge large language models with mergekit's model_stock, on one machine or a fleet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text, or as one JSON object per line (for log aggregators:
    /// time, level, message and fields such as task, worker and attempt as keys).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Read Hugging Face models from the Hub even when the local HF cache has them (the
    /// cache is never written either way).
    #[arg(long, global = true, env = "MERGEFLEET_NO_HF_CACHE")]
    pub no_hf_cache: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Merge in this process: read the models, write the merged checkpoint to OUT.
    Merge(MergeArgs),
    /// Read only the headers, check everything, and print what a merge would do.
    Plan(PlanArgs),
    /// Cluster mode: plan the merge and hand its tasks to workers over gRPC.
    Coordinator(CoordinatorArgs),
    /// Cluster mode: run tasks for a coordinator.
    Worker(WorkerArgs),
    /// Cluster mode: print a running coordinator's progress and workers.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// Output: a directory every worker mounts (ReadWriteMany), or s3://, gs://, az:// prefix.
    pub out: String,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:7300")]
    pub listen: std::net::SocketAddr,
    /// File holding the shared token (else MERGEFLEET_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate (and --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Run without a token (loopback or TLS only).
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Attempts per task before the merge fails.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// A task whose worker sends no heartbeat for this long goes to another worker.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub lease_timeout: std::time::Duration,
    /// Discard the resume journal in OUT and start over.
    #[arg(long)]
    pub restart: bool,
    /// Replace a complete checkpoint already at OUT.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long)]
    pub no_copy_tokenizer: bool,
    #[arg(long)]
    pub no_model_card: bool,
    /// After the end, how long to keep answering so every worker learns the outcome.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub linger: std::time::Duration,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How a worker or `status` reaches the coordinator.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The coordinator's URL, e.g. http://mergefleet-coordinator:7300
    #[arg(long)]
    pub coordinator: String,
    /// File holding the shared token (else MERGEFLEET_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate authority for a TLS coordinator.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl ConnectArgs {
    pub fn token(&self) -> crate::Result<Option<String>> {
        crate::security::load_token(self.token_file.as_deref()).map_err(crate::Error::Usage)
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The most memory this worker may use, e.g. its container's limit; tasks get all but
    /// a reserve for the process itself (default: half of physical memory or cgroup limit).
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Compute threads (default: all cores; more than the cores are capped).
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Name shown in the coordinator's logs and status (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Keep trying an unreachable coordinator this long, then exit non-zero.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub retry_for: std::time::Duration,
    /// Tasks run at once, within --memory-limit: at most two fetching their inputs (the
    /// next is leased once one has them) while the others compute and write.
    #[arg(long, default_value_t = 4)]
    pub tasks_in_flight: usize,
    /// Serve the gRPC health service on this address, for a liveness probe.
    #[arg(long)]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// How input bytes are read from object stores (see [`crate::store::ReadParts`]).
#[derive(Args, Debug)]
pub struct ReadArgs {
    /// Largest part of an object-store read: each read is split into up to
    /// --read-concurrency parts (at least 1 MiB) fetched concurrently, since a store limits
    /// each connection's throughput.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub read_part_size: u64,
    /// Most object-store read requests in flight at once in this process.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub read_concurrency: u32,
}

impl ReadArgs {
    pub fn parts(&self) -> crate::store::ReadParts {
        crate::store::ReadParts {
            part_size: self.read_part_size,
            concurrency: self.read_concurrency as usize,
        }
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ShardArgs {
    /// Largest output file, in bytes of tensor data (decimal K/M/B suffixes: 5B = 5e9).
    #[arg(long, default_value = "5B", value_parser = parse_size)]
    pub out_shard_size: u64,
    /// Target bytes read per task (bigger tensors are a task of their own).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub task_size: u64,
    /// The order of model_stock's sums: `torch` (what `mergekit-yaml -j 1` computes on CPU,
    /// bit for bit) or `exact` (correctly rounded).
    #[arg(long, default_value = "torch", value_parser = parse_reductions)]
    pub reductions: Reductions,
    /// `fp8`: write every tensor that is block-FP8 in the base as FP8 again (F8_E4M3 with
    /// `_scale_inv` scales, the base's block size), as the base was released.
    #[arg(long, value_parser = ["fp8"])]
    pub quantize: Option<String>,
    /// The seed of the random stream dare and della draw from (mergekit's
    /// `--random-seed`); without it a seed is drawn and printed, so the merge can be
    /// repeated.
    #[arg(long)]
    pub random_seed: Option<u64>,
}

fn parse_reductions(s: &str) -> Result<Reductions, String> {
    Reductions::from_name(s).ok_or_else(|| format!("`{s}`: use torch or exact"))
}

impl ShardArgs {
    /// The plan options; without `--random-seed`, a seed drawn now.
    pub fn options(&self) -> PlanOptions {
        self.options_seeded(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        })
    }

    /// The plan options of a coordinator: without `--random-seed`, a seed derived from the
    /// config and the output, so a coordinator its Job restarts draws the same numbers
    /// and resumes its journal.
    pub fn options_for(&self, config: &str, out: &str) -> PlanOptions {
        self.options_seeded(|| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in config.bytes().chain([0]).chain(out.bytes()) {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            h
        })
    }

    fn options_seeded(&self, seed: impl FnOnce() -> u64) -> PlanOptions {
        PlanOptions {
            out_shard_size: self.out_shard_size,
            task_size: self.task_size,
            reductions: self.reductions,
            quantize_fp8: self.quantize.is_some(),
            // A 32-bit seed: torch seeds its generator with the low 32 bits anyway.
            random_seed: self.random_seed.unwrap_or_else(|| seed() & 0xffff_ffff),
            random_seed_given: self.random_seed.is_some(),
            ..PlanOptions::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// Output directory or object-store URL (s3://bucket/prefix, gs://, az://, file://).
    pub out: String,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Compute threads (default: all cores; more than the cores are capped).
    #[arg(long, value_parser = parse_threads)]
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
    #[command(flatten)]
    pub read: ReadArgs,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a number of threads (1 or more)")),
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The mergekit YAML config.
    pub config: PathBuf,
    /// The output a merge would write (optional): checked as `merge` checks it, and how
    /// many incomplete uploads of earlier merges a merge there would abort.
    pub out: Option<String>,
    #[command(flatten)]
    pub shard: ShardArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}
