//! mergefleet: mergekit's `model_stock` merge for very large models, in one process or
//! spread over a fleet of workers.
//!
//! The data flow, and the module of each step:
//! config ([`config`]) -> headers ([`source`], over [`store`]) -> plan, pure ([`plan`]) ->
//! tasks executed by [`exec`] (fetch ranges -> [`merge`] kernel -> [`sink`]) -> small files
//! and commit ([`job`], [`checkpoint`]). Three modes run it: [`embedded`] in one process, or
//! a [`coordinator`] handing tasks over the gRPC contract ([`wire`]) to [`worker`]s. Below
//! them all: dtypes ([`dtype`]), the safetensors header ([`header`]), memory ([`memory`]) and
//! errors ([`error`]); beside the cluster roles, their Prometheus [`metrics`].

// Errors carry the names and shapes users need; they are built once, on a cold path.
#![allow(clippy::result_large_err)]

pub mod args;
pub mod checkpoint;
pub mod config;
pub mod coordinator;
pub mod dtype;
pub mod embedded;
pub mod error;
pub mod exec;
pub mod fp8;
pub mod header;
pub mod hub;
pub mod hugepages;
pub mod index;
pub mod job;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod params;
pub mod plan;
pub mod reference;
pub mod resolve;
pub mod security;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod store;
pub mod synth;
pub mod units;
pub mod vocab;
pub mod wire;
pub mod worker;

pub use error::{Error, Result};
