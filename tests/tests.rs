//! Integration tests: the real `mergefleet` binary and processes, a real S3-compatible server,
//! real kills. This file is the table of contents; each module says what it proves.

/// Bad input: exit 2, a clear message, no checkpoint.
mod bad_input;
/// Cluster mode with real processes: coordinator and workers over gRPC, faults, chaos.
mod cluster;
/// The contract: inputs never touched, one owner per output, overwrite, YAML semantics.
mod contract;
/// Fidelity at real size: mergekit's SHA-256 of every output tensor of regenerated inputs.
mod fidelity;
/// The cluster over a real network: hosts in network namespaces, S3 on its own host.
mod fleet;
/// Block-FP8 inputs: mergekit's bytes from the officially dequantized models; refusals.
mod fp8;
/// mergekit's golden outputs, bit for bit; what a checkpoint holds.
mod golden;
/// Hugging Face Hub ids: a real nginx shaped like the Hub, the real huggingface_hub cache.
mod hub;
/// The container image run with podman: its user, a merge, a cluster of containers.
mod image;
/// Kills and SIGTERM mid-merge leave nothing that looks complete.
mod interrupted;
/// The Kubernetes manifests: rendered, checked, and rehearsed as local processes.
mod k8s;
/// LoRA adapters applied on read, against mergekit's PEFT step, bit for bit.
mod lora;
/// mergekit's other methods (linear, task_arithmetic), bit for bit with its goldens.
mod methods;
/// S3 in and out, byte-identical to local; S3 errors.
mod s3;
/// A 671B-class plan: planning time and message sizes.
mod scale;
/// Shared helpers: running the binary, the S3 server, comparing checkpoints.
mod util;
/// Vocabulary merges (`tokenizer_source`, `tokenizer:`, `chat_template`) against mergekit's.
mod vocab;
