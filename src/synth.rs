//! Synthetic LLaMA-style checkpoints for tests, examples and benchmarks.
//!
//! No real weights can be downloaded on our machines, so tests and benchmarks make their own:
//! a base model and fine-tunes (base + 0.002 x noise, half of the noise shared between
//! fine-tunes, as in the golden fixtures), written tensor by tensor in bfloat16 so even
//! multi-gigabyte sets need little memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use crate::plan::header_bytes;

/// The dimensions of a LLaMA-style model.
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Write an `lm_head.weight` (false: tied embeddings).
    pub lm_head: bool,
}

impl LlamaShape {
    /// Tensor names and shapes in the order HF checkpoints list them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let kv = h / self.heads * self.kv_heads;
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![self.intermediate, h],
            ));
            t.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![self.intermediate, h],
            ));
            t.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![h, self.intermediate],
            ));
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        if self.lm_head {
            t.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        t
    }

    /// A `config.json` for this shape.
    pub fn config_json(&self) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "tie_word_embeddings": !self.lm_head,
            "torch_dtype": "bfloat16",
        })
        .to_string()
    }
}

/// xorshift64*: fast, deterministic, good enough for noise.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[inline]
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn seed_of(name: &str, salt: u64) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ salt, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Write a model: `variant` 0 is the base; 1.. are fine-tunes of it.
/// Files: `model.safetensors` (or `shards` shards + index) and `config.json`.
pub fn write_model(
    dir: &Path,
    shape: &LlamaShape,
    variant: u64,
    shards: usize,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), shape.config_json())?;
    let tensors = shape.tensors();
    let shards = shards.clamp(1, tensors.len());
    let per = tensors.len().div_ceil(shards);
    let groups: Vec<&[(String, Vec<usize>)]> = tensors.chunks(per).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.iter().enumerate() {
        let name = if groups.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len())
        };
        let mut sorted: Vec<&(String, Vec<usize>)> = group.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut off = 0;
        let infos = sorted
            .iter()
            .map(|(n, s)| {
                let bytes = s.iter().product::<usize>() * 2;
                off += bytes;
                weight_map.insert(n.clone(), serde_json::Value::String(name.clone()));
                (
                    n.clone(),
                    TensorInfo {
                        dtype: Dtype::BF16,
                        shape: s.clone(),
                        data_offsets: (off - bytes, off),
                    },
                )
            })
            .collect();
        let header = header_bytes(infos).map_err(std::io::Error::other)?;
        let mut w = BufWriter::with_capacity(1 << 20, File::create(dir.join(&name))?);
        w.write_all(&header)?;
        let mut buf = Vec::new();
        for (n, s) in sorted {
            let numel: usize = s.iter().product();
            let mut base = Rng::new(seed_of(n, 0));
            let mut shared = Rng::new(seed_of(n, 1));
            let mut own = Rng::new(seed_of(n, 1000 + variant));
            let norm = n.contains("norm");
            buf.clear();
            buf.reserve(numel * 2);
            for _ in 0..numel {
                let b = if norm {
                    1.0 + 0.1 * base.next()
                } else {
                    0.05 * base.next()
                };
                let v = if variant == 0 {
                    b
                } else {
                    b + 0.002 * (shared.next() + own.next())
                };
                buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            }
            w.write_all(&buf)?;
        }
        w.flush()?;
    }
    if groups.len() > 1 {
        let total: usize = tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() * 2)
            .sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    }
    Ok(())
}

/// Write `base/` and `ft1/`..`ftN/` under `dir` and a `model_stock.yml` merging them.
pub fn write_set(
    dir: &Path,
    shape: &LlamaShape,
    fine_tunes: usize,
    shards: usize,
) -> std::io::Result<()> {
    write_model(&dir.join("base"), shape, 0, shards)?;
    let mut yaml = String::from("models:\n");
    for i in 1..=fine_tunes {
        write_model(&dir.join(format!("ft{i}")), shape, i as u64, shards)?;
        yaml.push_str(&format!(
            "  - model: {}\n",
            dir.join(format!("ft{i}")).display()
        ));
    }
    yaml.push_str(&format!(
        "merge_method: model_stock\nbase_model: {}\ndtype: bfloat16\n",
        dir.join("base").display()
    ));
    std::fs::write(dir.join("model_stock.yml"), yaml)
}
