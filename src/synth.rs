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

use crate::header::write_header;

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
    /// A 2-layer model of about 5 MB in bfloat16: whole clusters, containers and
    /// rehearsals merge sets of it in seconds.
    pub fn small() -> Self {
        LlamaShape {
            hidden: 256,
            layers: 2,
            intermediate: 768,
            vocab: 4096,
            heads: 4,
            kv_heads: 2,
            lm_head: true,
        }
    }

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
        let header = write_header(infos).map_err(std::io::Error::other)?;
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

/// The tensor layout of a DeepSeek-V3-class checkpoint (671B parameters): 61 layers (3 dense,
/// 58 mixture-of-experts with 256 routed experts + 1 shared), multi-head latent attention,
/// a multi-token-prediction layer; 91,991 tensors, names, shapes and dtypes as the published
/// checkpoint: the big matrices block-FP8 (`F8_E4M3` with float32 `weight_scale_inv`
/// companions, 128x128 blocks), the rest bfloat16.
pub fn deepseek_v3_tensors() -> Vec<(String, Vec<usize>, Dtype)> {
    const H: usize = 7168;
    const VOCAB: usize = 129_280;
    let mut t: Vec<(String, Vec<usize>, Dtype)> = Vec::new();
    let matrix = |t: &mut Vec<_>, name: String, rows: usize, cols: usize| {
        let scales = vec![rows.div_ceil(128), cols.div_ceil(128)];
        t.push((format!("{name}.weight"), vec![rows, cols], Dtype::F8_E4M3));
        t.push((format!("{name}.weight_scale_inv"), scales, Dtype::F32));
    };
    let vector = |t: &mut Vec<_>, name: String, n: usize| t.push((name, vec![n], Dtype::BF16));
    t.push((
        "model.embed_tokens.weight".into(),
        vec![VOCAB, H],
        Dtype::BF16,
    ));
    for l in 0..62 {
        let p = format!("model.layers.{l}");
        vector(&mut t, format!("{p}.input_layernorm.weight"), H);
        vector(&mut t, format!("{p}.post_attention_layernorm.weight"), H);
        let a = format!("{p}.self_attn");
        matrix(&mut t, format!("{a}.q_a_proj"), 1536, H);
        vector(&mut t, format!("{a}.q_a_layernorm.weight"), 1536);
        matrix(&mut t, format!("{a}.q_b_proj"), 128 * 192, 1536);
        matrix(&mut t, format!("{a}.kv_a_proj_with_mqa"), 576, H);
        vector(&mut t, format!("{a}.kv_a_layernorm.weight"), 512);
        matrix(&mut t, format!("{a}.kv_b_proj"), 128 * 256, 512);
        matrix(&mut t, format!("{a}.o_proj"), H, 128 * 128);
        let m = format!("{p}.mlp");
        if l < 3 {
            matrix(&mut t, format!("{m}.gate_proj"), 18432, H);
            matrix(&mut t, format!("{m}.up_proj"), 18432, H);
            matrix(&mut t, format!("{m}.down_proj"), H, 18432);
            continue;
        }
        t.push((format!("{m}.gate.weight"), vec![256, H], Dtype::BF16));
        t.push((
            format!("{m}.gate.e_score_correction_bias"),
            vec![256],
            Dtype::F32,
        ));
        for e in (0..256)
            .map(|e| format!("{m}.experts.{e}"))
            .chain([format!("{m}.shared_experts")])
        {
            matrix(&mut t, format!("{e}.gate_proj"), 2048, H);
            matrix(&mut t, format!("{e}.up_proj"), 2048, H);
            matrix(&mut t, format!("{e}.down_proj"), H, 2048);
        }
        if l == 61 {
            // The multi-token-prediction module rides on the last layer.
            t.push((
                format!("{p}.embed_tokens.weight"),
                vec![VOCAB, H],
                Dtype::BF16,
            ));
            vector(&mut t, format!("{p}.enorm.weight"), H);
            vector(&mut t, format!("{p}.hnorm.weight"), H);
            t.push((format!("{p}.eh_proj.weight"), vec![H, 2 * H], Dtype::BF16));
            vector(&mut t, format!("{p}.shared_head.norm.weight"), H);
            t.push((
                format!("{p}.shared_head.head.weight"),
                vec![VOCAB, H],
                Dtype::BF16,
            ));
        }
    }
    vector(&mut t, "model.norm.weight".into(), H);
    t.push(("lm_head.weight".into(), vec![VOCAB, H], Dtype::BF16));
    t
}

/// Write a model's headers, index and `config` (config.json) with no data: each file is
/// extended to its full size as a sparse file, so a 1.3 TB checkpoint takes a few megabytes
/// of disk. Enough for everything that reads only headers (`plan`, the coordinator). Tensors
/// are spread over `files` files in order, balanced by bytes.
pub fn write_sparse_model(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Dtype)],
    files: usize,
    config: &serde_json::Value,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes =
        |(_, s, d): &(String, Vec<usize>, Dtype)| s.iter().product::<usize>() * d.bitsize() / 8;
    let total: usize = tensors.iter().map(bytes).sum();
    let files = files.clamp(1, tensors.len());
    let mut groups: Vec<Vec<&(String, Vec<usize>, Dtype)>> = vec![Vec::new(); files];
    let mut acc = 0;
    for t in tensors {
        // The file whose share of the bytes this tensor starts in.
        groups[(acc * files / total.max(1)).min(files - 1)].push(t);
        acc += bytes(t);
    }
    groups.retain(|g| !g.is_empty());
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        let mut off = 0;
        let infos = group
            .iter()
            .map(|t| {
                let b = bytes(t);
                off += b;
                weight_map.insert(t.0.clone(), serde_json::Value::String(name.clone()));
                let info = TensorInfo {
                    dtype: t.2,
                    shape: t.1.clone(),
                    data_offsets: (off - b, off),
                };
                (t.0.clone(), info)
            })
            .collect();
        let header = write_header(infos).map_err(std::io::Error::other)?;
        let f = File::create(dir.join(&name))?;
        (&f).write_all(&header)?;
        f.set_len((header.len() + off) as u64)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    std::fs::write(dir.join("config.json"), config.to_string())
}

/// DeepSeek-V3's config.json (block FP8).
fn deepseek_v3_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "n_routed_experts": 256,
        "vocab_size": 129280,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    })
}

/// A 671B-class set under `dir`: `base/` and `ft1/`..`ftN/` with the DeepSeek-V3 layout in
/// 163 sparse files each, and `model_stock.yml` merging them.
pub fn write_sparse_deepseek_set(dir: &Path, fine_tunes: usize) -> std::io::Result<()> {
    let tensors = deepseek_v3_tensors();
    let mut yaml = String::from("models:\n");
    for name in
        std::iter::once("base".to_string()).chain((1..=fine_tunes).map(|i| format!("ft{i}")))
    {
        write_sparse_model(&dir.join(&name), &tensors, 163, &deepseek_v3_config())?;
        if name != "base" {
            yaml.push_str(&format!("  - model: {}\n", dir.join(&name).display()));
        }
    }
    yaml.push_str(&format!(
        "merge_method: model_stock\nbase_model: {}\ndtype: bfloat16\n",
        dir.join("base").display()
    ));
    std::fs::write(dir.join("model_stock.yml"), yaml)
}

/// A 120B-class frankenmerge under `dir`: two Llama-2-70B-layout models `a/` and `b/` (80
/// layers, hidden 8192, bfloat16, 29 sparse files each) and `frankenmerge.yml`, the
/// passthrough stack of Goliath-120B (interleaved 16-layer ranges of both: 137 layers).
pub fn write_sparse_frankenmerge_set(dir: &Path) -> std::io::Result<()> {
    let shape = LlamaShape {
        hidden: 8192,
        layers: 80,
        intermediate: 28672,
        vocab: 32000,
        heads: 64,
        kv_heads: 8,
        lm_head: true,
    };
    let tensors: Vec<(String, Vec<usize>, Dtype)> = shape
        .tensors()
        .into_iter()
        .map(|(n, s)| (n, s, Dtype::BF16))
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&shape.config_json()).expect("a JSON config");
    let mut yaml = String::from("slices:\n");
    for (i, (a, b)) in [
        (0, 16),
        (8, 24),
        (17, 32),
        (25, 40),
        (33, 48),
        (41, 56),
        (49, 64),
        (57, 72),
        (65, 80),
    ]
    .into_iter()
    .enumerate()
    {
        let m = if i % 2 == 0 { "a" } else { "b" };
        yaml.push_str(&format!(
            "  - sources:\n      - model: {}\n        layer_range: [{a}, {b}]\n",
            dir.join(m).display()
        ));
    }
    yaml.push_str("merge_method: passthrough\ndtype: bfloat16\n");
    for m in ["a", "b"] {
        write_sparse_model(&dir.join(m), &tensors, 29, &config)?;
    }
    std::fs::write(dir.join("frankenmerge.yml"), yaml)
}

/// Turn the bfloat16 model in `dir` into block FP8 as DeepSeek ships its checkpoints: every
/// `*_proj.weight` matrix quantized (DeepGEMM's formula, [`crate::fp8`]) into `F8_E4M3`
/// with its float32 `_scale_inv` right after it in the same file, `quantization_config` in
/// `config.json`. Other tensors stay as they are.
pub fn quantize_model(dir: &Path, block: [usize; 2]) -> std::io::Result<()> {
    use crate::fp8::{Blocks, SCALE_SUFFIX};
    rewrite_model(dir, |name, dtype, shape, bytes, push| match shape {
        &[rows, cols] if name.ends_with("_proj.weight") && dtype == Dtype::BF16 => {
            let blocks = Blocks { rows, cols, block };
            let mut q = vec![0u8; rows * cols];
            let mut s = vec![0u8; blocks.scale_bytes() as usize];
            blocks.quantize(bytes, Dtype::BF16, 0, &mut q, &mut s);
            push(name.to_string(), Dtype::F8_E4M3, shape.to_vec(), &q);
            push(
                format!("{name}{SCALE_SUFFIX}"),
                Dtype::F32,
                blocks.scale_shape().to_vec(),
                &s,
            );
        }
        _ => push(name.to_string(), dtype, shape.to_vec(), bytes),
    })?;
    update_config(dir, |config| {
        config["quantization_config"] = serde_json::json!({
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": block,
        })
    })
}

/// Turn the bfloat16 model in `dir` into a float16 one (each value rounded to the nearest
/// float16; `torch_dtype` in `config.json` follows), for float16 benchmarks on the same
/// shapes and bytes.
pub fn to_float16(dir: &Path) -> std::io::Result<()> {
    rewrite_model(dir, |name, dtype, shape, bytes, push| {
        if dtype != Dtype::BF16 {
            return push(name.to_string(), dtype, shape.to_vec(), bytes);
        }
        let f16: Vec<u8> = bytes
            .chunks_exact(2)
            .flat_map(|c| {
                let v = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                half::f16::from_f32(v).to_bits().to_le_bytes()
            })
            .collect();
        push(name.to_string(), Dtype::F16, shape.to_vec(), &f16);
    })?;
    update_config(dir, |config| config["torch_dtype"] = "float16".into())
}

/// A tensor pushed into a rewritten file: name, dtype, shape, bytes.
type Push<'a> = dyn FnMut(String, Dtype, Vec<usize>, &[u8]) + 'a;

/// Rewrite every safetensors file of the model in `dir`, tensor by tensor in file order:
/// `f` gets each tensor (name, dtype, shape, bytes) and pushes what replaces it; the index,
/// if any, is rewritten to match.
fn rewrite_model(
    dir: &Path,
    mut f: impl FnMut(&str, Dtype, &[usize], &[u8], &mut Push),
) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::other(m);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "safetensors"));
    for path in files {
        let raw = std::fs::read(&path)?;
        let n = u64::from_le_bytes(raw[..8].try_into().map_err(|_| bad("short file".into()))?);
        let (entries, _) =
            crate::header::parse_header(&raw[8..8 + n as usize], raw.len() as u64).map_err(bad)?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let (mut infos, mut data) = (Vec::new(), Vec::new());
        let mut push = |n: String, dtype, shape: Vec<usize>, bytes: &[u8]| {
            infos.push((
                n.clone(),
                TensorInfo {
                    dtype,
                    shape,
                    data_offsets: (data.len(), data.len() + bytes.len()),
                },
            ));
            data.extend_from_slice(bytes);
            weight_map.insert(n, serde_json::Value::String(name.clone()));
        };
        for e in entries {
            let bytes = &raw[e.start as usize..e.end as usize];
            f(&e.name, e.dtype, &e.shape, bytes, &mut push);
        }
        total += data.len();
        let header = write_header(infos).map_err(bad)?;
        let mut w = BufWriter::new(File::create(&path)?);
        w.write_all(&header)?;
        w.write_all(&data)?;
        w.flush()?;
    }
    if dir.join("model.safetensors.index.json").exists() {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    }
    Ok(())
}

/// Edit `config.json` of the model in `dir`.
fn update_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::other(m);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .map_err(|e| bad(e.to_string()))?;
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string())
}
