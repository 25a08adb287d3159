//! Merging models whose vocabularies differ, as mergekit 0.1.5's `tokenizer_source` and
//! `tokenizer:` do it.
//!
//! A fine-tune that added ChatML tokens has more embedding rows than its base; two models
//! trained with different tokenizers number the same token differently. Merging their
//! embeddings row by row would mix unrelated tokens: silently broken text. mergekit builds
//! an output tokenizer (the base's, one model's, or the union of all), maps every output
//! token to each model's own row, fills the rows a model lacks from the others, and only
//! then merges. This module does the same in three layers:
//! - [`build`]: the output tokenizer and, per model, output id -> own id (pure);
//! - [`rows`]: per vocabulary tensor, where each input's output rows come from, as compact
//!   runs (pure, sent to workers with the task), and applying it to fetched bytes;
//! - [`files`]: reading the models' tokenizer files and writing the output's (I/O);
//! - [`templates`]: the chat templates a config may name.

pub mod build;
pub mod files;
pub mod rows;
pub mod templates;

pub use build::{ModelTokenizer, Vocabulary};
pub use rows::{RowFrom, RowMap, Run, VocabTensor};

/// The tensors indexed by token along their first axis, as mergekit's architecture files
/// name them (input embeddings, output heads and their biases).
pub const VOCAB_TENSORS: &[&str] = &[
    "lm_head.weight",
    "lm_head.bias",
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "transformer.embd.wte.weight",
    "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight",
    "transformer.output_layer.weight",
    "gpt_neox.embed_in.weight",
    "embed_out.weight",
    "embed_tokens.weight",
    "model.tok_embeddings.weight",
    "output.weight",
    "backbone.embeddings.weight",
    "lm_head.linear.weight",
    "lm_head.linear.bias",
    "lm_head.decoder.weight",
];

/// Is `name` a tensor with one row per token?
pub fn is_vocab_tensor(name: &str) -> bool {
    VOCAB_TENSORS.contains(&name)
}

/// A vocabulary merge that cannot be done, naming the model, tensor or key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VocabError {
    #[error("tokenizer of `{model}`: {message}")]
    Tokenizer { model: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("tensor `{tensor}` of `{model}`: {message}")]
    Tensor {
        tensor: String,
        model: String,
        message: String,
    },
}
