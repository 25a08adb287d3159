//! A merge job from config to plan, shared by `plan`, embedded mode and the coordinator.
//!
//! Loading a job reads the config and every model's headers (nothing else), checks all that
//! can be known before weights move, and plans the merge. Writing a job's checkpoint files
//! other than tensors (config.json, tokenizer, card, index) also lives here, so every mode
//! commits a checkpoint the same way.

use bytes::Bytes;
use futures::future::try_join_all;

use crate::checkpoint;
use crate::config::{ConfigError, MergeConfig};
use crate::error::Result;
use crate::plan::{plan_with_vocab, MergePlan, PlanOptions};
use crate::resolve;
use crate::sink::{Sink, SinkError, INDEX_NAME};
use crate::source::adapter::open_adapter;
use crate::source::{open_model, ModelSource, SourceError};
use crate::store::{head_size, read_small, Location, Stores};
use crate::vocab::{build, files, Vocabulary};

/// A planned merge.
pub struct Job {
    pub config: MergeConfig,
    /// Base first, then the fine-tunes in config order.
    pub models: Vec<ModelSource>,
    pub plan: MergePlan,
    /// The output's `config.json` (the base's, with the output dtype), when the base has one.
    pub config_json: Option<Bytes>,
    /// The paths (as written) of the models read from the Hugging Face Hub, for the card.
    pub hub_models: Vec<String>,
    /// The merged vocabulary (`tokenizer_source` / `tokenizer`).
    pub vocab: Option<Vocabulary>,
    /// The output's tokenizer files, made at load time (a vocabulary merge or a
    /// `chat_template`); otherwise the base's are copied as they are.
    pub tokenizer_files: Option<Vec<(String, Bytes)>>,
}

impl Job {
    /// Parse the config and plan the merge from the models' headers. Everything a merge
    /// would refuse before moving weights is refused here, so `plan` checks it too.
    pub async fn load(config_yaml: &str, stores: &Stores, opts: PlanOptions) -> Result<Job> {
        let mut config = MergeConfig::from_yaml(config_yaml)?;
        let pinned =
            try_join_all(config.all_models().map(|m| resolve::pin(stores, &m.model))).await?;
        let adapters = try_join_all(config.all_models().map(|m| async {
            match &m.lora {
                Some(l) => resolve::pin(stores, l).await.map(Some),
                None => Ok(None),
            }
        }))
        .await?;
        config.warnings.extend(
            pinned
                .iter()
                .chain(adapters.iter().flatten())
                .filter_map(|p| p.note.clone()),
        );
        let locations = pinned
            .iter()
            .map(|p| stores.resolve(&p.spec))
            .collect::<Result<Vec<_>, _>>()?;
        let adapter_locations = adapters
            .iter()
            .map(|a| a.as_ref().map(|p| stores.resolve(&p.spec)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        refuse_duplicates(&config, &locations, &adapter_locations)?;
        let mut models = try_join_all(
            config
                .all_models()
                .zip(&pinned)
                .map(|(m, p)| open_model(stores, &p.spec, &m.text)),
        )
        .await?;
        for ((model, m), a) in models.iter_mut().zip(config.all_models()).zip(&adapters) {
            if let (Some(a), Some(l)) = (a, &m.lora) {
                refuse_mixed_dtypes(model)?;
                model.adapter = Some(open_adapter(stores, &a.spec, &l.to_string()).await?);
            }
        }
        let (vocab, tokenizer_files) = tokenizer(&mut config, &locations).await?;
        let plan = plan_with_vocab(&config, &models, vocab.as_ref(), opts)?;
        let config_json = output_config_json(
            &models[0].location,
            &config,
            &plan,
            vocab.as_ref().map(|v| v.padded),
        )
        .await?;
        let mut hub_models: Vec<String> = Vec::new();
        for ((m, p), a) in config.all_models().zip(&pinned).zip(&adapters) {
            let named = std::iter::once((&m.model.path, Some(p)))
                .chain(m.lora.as_ref().map(|l| (&l.path, a.as_ref())));
            for (path, pin) in named {
                if pin.is_some_and(|p| p.spec.starts_with("hf://")) && !hub_models.contains(path) {
                    hub_models.push(path.clone());
                }
            }
        }
        Ok(Job {
            config,
            models,
            plan,
            config_json,
            hub_models,
            vocab,
            tokenizer_files,
        })
    }

    /// Refuse an output that is, contains, or lies inside an input: writing there could
    /// destroy a user's model (an `--overwrite` of the base's own folder removed its
    /// weights before reading them). Checked before anything is written.
    pub fn check_output(&self, out: &Location) -> Result<(), SinkError> {
        let (out_store, out_path) = out.identity();
        for (m, reference) in self.models.iter().zip(self.config.all_models()) {
            let (store, path) = m.location.identity();
            let how = if store != out_store {
                continue;
            } else if path == out_path {
                "is"
            } else if path.starts_with(&out_path) {
                "contains"
            } else if out_path.starts_with(&path) {
                "lies inside"
            } else {
                continue;
            };
            return Err(SinkError::OverlapsInput {
                output: out.display.clone(),
                how,
                input: reference.text.clone(),
            });
        }
        Ok(())
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
        match &self.config_json {
            Some(out) => sink.put("config.json", out.clone()).await?,
            None => warnings.push(format!(
                "the base model has no config.json ({}); the output has none either, so transformers cannot load it until you add one",
                base.child_display("config.json")
            )),
        }
        // A merged vocabulary brings its own tokenizer files (mergekit saves the tokenizer it
        // built, whatever --no-copy-tokenizer says); otherwise the base's are copied, with a
        // configured chat template written over them.
        if copy_tokenizer && self.vocab.is_none() {
            for name in checkpoint::COPIED_FILES {
                let url = base.child_display(name);
                if head_size(store, &base.child(name), &url).await?.is_some() {
                    let data = read_small(store, &base.child(name), &url).await?;
                    sink.put(name, data).await?;
                }
            }
        }
        match &self.tokenizer_files {
            Some(files) if copy_tokenizer || self.vocab.is_some() => {
                for (name, data) in files {
                    sink.put(name, data.clone()).await?;
                }
            }
            Some(_) => warnings.push(
                "`chat_template` is not written: --no-copy-tokenizer leaves the tokenizer out"
                    .into(),
            ),
            None => {}
        }
        sink.put(
            "mergekit_config.yml",
            Bytes::from(self.config.source_yaml.clone()),
        )
        .await?;
        if model_card {
            sink.put(
                "README.md",
                Bytes::from(checkpoint::model_card(&self.config, &self.hub_models)),
            )
            .await?;
        }
        Ok(warnings)
    }

    /// Does `location` hold this job's committed checkpoint? Its `mergekit_config.yml` is
    /// this config, its index (sharded outputs) is the one this plan writes, and every
    /// output file has its planned size. A coordinator restarted by its Job after the
    /// commit finds it there (the journal is gone by then) and has nothing left to do.
    pub async fn is_committed_at(&self, location: &Location) -> Result<bool> {
        let store = location.store.as_ref();
        let same = |name: &'static str, want: Vec<u8>| async move {
            let url = location.child_display(name);
            let path = location.child(name);
            Ok::<_, crate::Error>(match head_size(store, &path, &url).await? {
                Some(n) if n == want.len() as u64 => read_small(store, &path, &url).await? == want,
                _ => false,
            })
        };
        if !same(
            "mergekit_config.yml",
            self.config.source_yaml.clone().into_bytes(),
        )
        .await?
        {
            return Ok(false);
        }
        if self.plan.files.len() > 1
            && !same(INDEX_NAME, checkpoint::index_json(&self.plan)).await?
        {
            return Ok(false);
        }
        for f in &self.plan.files {
            let url = location.child_display(&f.name);
            if head_size(store, &location.child(&f.name), &url).await? != Some(f.size) {
                return Ok(false);
            }
        }
        Ok(true)
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

/// Two spellings of one model (`./m/ft1` and `m/ft1/`, a path and its `file://` URL, a
/// symlink and its target, a Hub id and its cache snapshot) would merge a model with itself;
/// one model with two different adapters is two models.
fn refuse_duplicates(
    config: &MergeConfig,
    locations: &[Location],
    adapters: &[Option<Location>],
) -> Result<(), ConfigError> {
    let names: Vec<&str> = config.all_models().map(|m| m.text.as_str()).collect();
    let ids: Vec<_> = locations
        .iter()
        .zip(adapters)
        .map(|(l, a)| (l.identity(), a.as_ref().map(Location::identity)))
        .collect();
    for (j, id) in ids.iter().enumerate() {
        if let Some(i) = ids[..j].iter().position(|a| a == id) {
            let first = if i == 0 && config.base_model.is_some() {
                "base_model"
            } else {
                "models"
            };
            return Err(ConfigError::Key {
                key: "models".into(),
                message: format!(
                    "model `{}` is listed twice: `{}` ({first}) is the same model ({}). List each model once",
                    names[j], names[i], locations[j].display
                ),
            });
        }
    }
    Ok(())
}

/// mergekit loads a model it applies an adapter to in one dtype (its first float tensor's)
/// and casts every tensor to it; a model whose float tensors differ in dtype would come out
/// changed in ways not applied here: refuse it.
fn refuse_mixed_dtypes(model: &ModelSource) -> Result<(), SourceError> {
    let mut floats = model
        .tensors
        .values()
        .map(|t| t.dtype)
        .filter(|d| crate::dtype::is_float(*d));
    let Some(first) = floats.next() else {
        return Ok(());
    };
    match floats.find(|d| *d != first) {
        None => Ok(()),
        Some(other) => Err(SourceError::Unsupported {
            location: model.location.display.clone(),
            message: format!(
                "`{}` has a LoRA adapter but holds float tensors of two dtypes ({first:?} and {other:?}): mergekit casts such a model to one dtype before applying the adapter, which mergefleet does not; convert it to one dtype first",
                model.reference
            ),
        }),
    }
}

/// Read and check the base's config.json now (a merge must not fail on it hours later).
async fn output_config_json(
    base: &Location,
    config: &MergeConfig,
    plan: &MergePlan,
    vocab_size: Option<usize>,
) -> Result<Option<Bytes>> {
    let store = base.store.as_ref();
    let url = base.child_display("config.json");
    let path = base.child("config.json");
    if head_size(store, &path, &url).await?.is_none() {
        return Ok(None);
    }
    let raw = read_small(store, &path, &url).await?;
    // mergekit records the configured dtype only (`out_dtype`, else `dtype`).
    let dtype = config.out_dtype.or(config.dtype).map(|d| d.name());
    let layers: Vec<usize> = plan.layers.iter().map(|l| l.sources[0].1).collect();
    let layers = (!config.slices.is_empty()).then_some(layers.as_slice());
    let out = checkpoint::config_json(&raw, dtype, plan.writes_fp8(), layers, vocab_size)
        .map_err(|message| SourceError::Invalid { file: url, message })?;
    Ok(Some(Bytes::from(out)))
}

/// The merged vocabulary and the output's tokenizer files, when the config asks for either
/// (`tokenizer_source`/`tokenizer`, `chat_template`): every model's tokenizer files are
/// read (a few small reads each) and checked now, before a weight moves. Warnings go to
/// the config's.
async fn tokenizer(
    config: &mut MergeConfig,
    locations: &[Location],
) -> Result<(Option<Vocabulary>, Option<Vec<(String, Bytes)>>)> {
    if config.tokenizer.is_none() && config.chat_template.is_none() {
        return Ok((None, None));
    }
    let names: Vec<String> = config.all_models().map(|m| m.text.clone()).collect();
    // A named or written template needs only the base's files.
    let all = config.tokenizer.is_some()
        || matches!(
            config.chat_template,
            Some(crate::config::ChatTemplate::Auto)
        );
    let read = try_join_all(
        locations
            .iter()
            .zip(&names)
            .take(if all { locations.len() } else { 1 })
            .map(|(l, n)| files::read(l, n)),
    )
    .await?;
    let template = config
        .chat_template
        .as_ref()
        .and_then(|ct| files::chat_template(ct, &read));
    let Some(spec) = &config.tokenizer else {
        if read[0].tokenizer_config.is_none() && read[0].tokenizer_json.is_none() {
            config.warnings.push(format!(
                "`chat_template` is not written: the base model `{}` has no tokenizer files to put it in",
                names[0]
            ));
            return Ok((None, None));
        }
        let out = files::output_files(&read[0], None, template.as_deref())?;
        return Ok((None, Some(out)));
    };
    let tokenizers = read
        .iter()
        .map(|f| f.tokenizer(spec.key))
        .collect::<Result<Vec<_>, _>>()?;
    let vocab = build::build(spec, 0, &tokenizers, &names)?;
    config.warnings.extend(vocab.warnings.iter().cloned());
    let source = match spec.source {
        crate::config::TokenizerSource::Model(m) => &read[m],
        _ => &read[0],
    };
    let out = files::output_files(source, Some(&vocab), template.as_deref())?;
    Ok((Some(vocab), Some(out)))
}
