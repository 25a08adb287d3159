//! A merge job from config to plan, shared by `plan`, embedded mode and the coordinator.
//!
//! Loading a job reads the config and every model's headers (nothing else), checks all that
//! can be known before weights move, and plans the merge. Writing a job's checkpoint files
//! other than tensors (config.json, tokenizer, card, index) also lives here, so every mode
//! commits a checkpoint the same way.

use bytes::Bytes;
use futures::future::try_join_all;

use crate::checkpoint;
use crate::config::MergeConfig;
use crate::error::Result;
use crate::plan::{plan, MergePlan, PlanOptions};
use crate::sink::{Sink, INDEX_NAME};
use crate::source::{head_size, open_model, read_small, ModelSource, Stores};

/// A planned merge.
pub struct Job {
    pub config: MergeConfig,
    /// Base first, then the fine-tunes in config order.
    pub models: Vec<ModelSource>,
    pub plan: MergePlan,
}

impl Job {
    /// Parse the config and plan the merge from the models' headers.
    pub async fn load(config_yaml: &str, stores: &Stores, opts: PlanOptions) -> Result<Job> {
        let config = MergeConfig::from_yaml(config_yaml)?;
        let models = try_join_all(config.all_models().map(|m| open_model(stores, &m.0))).await?;
        let plan = plan(&config, &models, opts)?;
        Ok(Job {
            config,
            models,
            plan,
        })
    }

    /// Write everything but the tensors and the index: config.json, tokenizer files, the
    /// input YAML and the model card. Returns warnings for the user.
    pub async fn write_side_files(
        &self,
        sink: &Sink,
        copy_tokenizer: bool,
        model_card: bool,
    ) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let base = &self.models[0].location;
        let store = base.store.as_ref();
        let cfg_url = base.child_display("config.json");
        match head_size(store, &base.child("config.json"), &cfg_url).await? {
            Some(_) => {
                let raw = read_small(store, &base.child("config.json"), &cfg_url).await?;
                let dtype = self.plan.out_dtype.map(|d| d.name());
                let out = checkpoint::config_json(&raw, dtype, &cfg_url).map_err(|message| {
                    crate::source::SourceError::Invalid { file: cfg_url.clone(), message }
                })?;
                sink.put("config.json", Bytes::from(out)).await?;
            }
            None => warnings.push(format!(
                "the base model has no config.json ({cfg_url}); the output has none either, so transformers cannot load it until you add one"
            )),
        }
        if copy_tokenizer {
            for name in checkpoint::TOKENIZER_FILES {
                let url = base.child_display(name);
                if head_size(store, &base.child(name), &url).await?.is_some() {
                    let data = read_small(store, &base.child(name), &url).await?;
                    sink.put(name, data).await?;
                }
            }
        }
        sink.put(
            "mergekit_config.yml",
            Bytes::from(self.config.source_yaml.clone()),
        )
        .await?;
        if model_card {
            sink.put(
                "README.md",
                Bytes::from(checkpoint::model_card(&self.config)),
            )
            .await?;
        }
        Ok(warnings)
    }

    /// The commit point of a sharded checkpoint (a single file commits itself).
    pub async fn commit(&self, sink: &Sink) -> Result<()> {
        if self.plan.files.len() > 1 {
            sink.put(INDEX_NAME, Bytes::from(checkpoint::index_json(&self.plan)))
                .await?;
        }
        Ok(())
    }
}
