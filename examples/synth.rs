//! Write a synthetic model_stock set (base + fine-tunes + config) for benchmarks and demos.
//!
//! `cargo run --release --example synth -- DIR` writes the end-to-end benchmark set (bf16,
//! hidden 2048, 8 layers, intermediate 5632, vocab 32000: about 1 GB per model).
//! `--deepseek-sparse` writes a 671B-class layout instead, as sparse files (`benches/scale.sh`);
//! `--fp8` writes the set block-FP8, as DeepSeek ships its models, and `--f16` in float16
//! (both for `benches/e2e.sh`).

use std::path::PathBuf;

use clap::Parser;
use mergefleet::synth::{write_set, LlamaShape};

#[derive(Parser)]
struct Args {
    dir: PathBuf,
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 3)]
    fine_tunes: usize,
    /// Safetensors files per model.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Tied embeddings: no lm_head.weight.
    #[arg(long)]
    tied: bool,
    /// Instead: a 671B-class DeepSeek-V3 layout (163 sparse files per model, headers only).
    #[arg(long)]
    deepseek_sparse: bool,
    /// Instead: two Llama-2-70B-layout models (sparse, headers only) and a 120B-class
    /// passthrough frankenmerge of them (`frankenmerge.yml`).
    #[arg(long)]
    frankenmerge_sparse: bool,
    /// Write the models block-FP8, as DeepSeek ships them: every `*_proj.weight` F8_E4M3
    /// with 128x128-block `_scale_inv` scales.
    #[arg(long, conflicts_with = "f16")]
    fp8: bool,
    /// Write the models in float16 (the bfloat16 values rounded), merged with `dtype: float16`.
    #[arg(long)]
    f16: bool,
}

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let shape = LlamaShape {
        hidden: a.hidden,
        layers: a.layers,
        intermediate: a.intermediate,
        vocab: a.vocab,
        heads: a.heads,
        kv_heads: a.kv_heads,
        lm_head: !a.tied,
    };
    if a.deepseek_sparse {
        mergefleet::synth::write_sparse_deepseek_set(&a.dir, a.fine_tunes)?;
    } else if a.frankenmerge_sparse {
        mergefleet::synth::write_sparse_frankenmerge_set(&a.dir)?;
    } else {
        write_set(&a.dir, &shape, a.fine_tunes, a.shards)?;
        let models =
            std::iter::once("base".to_string()).chain((1..=a.fine_tunes).map(|i| format!("ft{i}")));
        for m in models {
            if a.fp8 {
                mergefleet::synth::quantize_model(&a.dir.join(m), [128, 128])?;
            } else if a.f16 {
                mergefleet::synth::to_float16(&a.dir.join(m))?;
            }
        }
        if a.f16 {
            let yml = a.dir.join("model_stock.yml");
            let text = std::fs::read_to_string(&yml)?;
            if !text.contains("\ndtype: bfloat16\n") {
                return Err(std::io::Error::other(format!(
                    "no `dtype: bfloat16` line in {}",
                    yml.display()
                )));
            }
            std::fs::write(
                &yml,
                text.replace("\ndtype: bfloat16\n", "\ndtype: float16\n"),
            )?;
        }
    }
    let cfg = if a.frankenmerge_sparse {
        "frankenmerge.yml"
    } else {
        "model_stock.yml"
    };
    println!("wrote {}", a.dir.join(cfg).display());
    Ok(())
}
