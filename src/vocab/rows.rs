//! Where each output row of a vocabulary tensor comes from, per input, and the gather that
//! applies it to an input's bytes (mergekit's `PermutedVocabulary`, `tokenizer/embed.py`).
//!
//! For every output token and input model: the model's own row when it has the token
//! (unless `force`), else a default shared by all inputs: the only model that has it, the
//! base's row, the mean of the models that have it (added in input order, rounded to the
//! dtype at every step as torch does), a `tokenizer.tokens` source, or zeros. Rows past the
//! vocabulary (`pad_to_multiple_of`) are each input's mean row, in torch's reduction order.
//! The map is stored as runs of consecutive rows, so a 150k-token vocabulary that mostly
//! keeps its order costs a few bytes in a task message.

use safetensors::Dtype;

use super::{VocabError, Vocabulary};
use crate::config::{TokenRef, TokenSource};
use crate::dtype;

/// How one vocabulary tensor's inputs are realigned. Indices of inputs are the kernel's.
#[derive(Debug, Clone, PartialEq)]
pub struct VocabTensor {
    /// Output rows from the vocabulary (the rest, to `padded`, are mean rows).
    pub rows: usize,
    pub padded: usize,
    /// Per input: its output rows `0..rows`.
    pub inputs: Vec<RowMap>,
    /// Mean rows: which (input, row) pairs, added in this order.
    pub averages: Vec<Vec<(u32, u32)>>,
    /// The dtype the realigned rows are held in (mergekit's gathered dtype).
    pub dtype: Dtype,
}

/// One input's output rows, as runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowMap {
    pub runs: Vec<Run>,
}

/// `len` output rows from `out` on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub out: u32,
    pub len: u32,
    pub from: RowFrom,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowFrom {
    /// Consecutive rows of an input, from `row` on.
    Rows { input: u32, row: u32 },
    /// Consecutive mean rows ([`VocabTensor::averages`]), from this one on.
    Average(u32),
    /// Rows of zeros (a token no model has, or one without a row for this input).
    Zero,
}

impl RowMap {
    fn push(&mut self, out: u32, from: RowFrom) {
        if let Some(last) = self.runs.last_mut() {
            let next = match last.from {
                RowFrom::Rows { input, row } => RowFrom::Rows {
                    input,
                    row: row + last.len,
                },
                RowFrom::Average(a) => RowFrom::Average(a + last.len),
                RowFrom::Zero => RowFrom::Zero,
            };
            if last.out + last.len == out && next == from {
                last.len += 1;
                return;
            }
        }
        self.runs.push(Run { out, len: 1, from });
    }
}

/// A default row, before it is placed.
#[derive(Clone, PartialEq)]
enum Default {
    Row(u32, u32),
    Average(Vec<(u32, u32)>),
    Zero,
}

/// The realignment of tensor `tensor`, whose inputs (in mergekit's order) are models
/// `models` (indices into the vocabulary's models) with `rows[k]` rows each; `base` is the
/// base's input, if the tensor has one.
pub fn tensor_rows(
    v: &Vocabulary,
    tensor: &str,
    models: &[usize],
    names: &[String],
    rows: &[usize],
    base: Option<usize>,
    dtype: Dtype,
) -> Result<VocabTensor, VocabError> {
    let n = v.size();
    let spec = &v.spec;
    // Each model's row for an output id, checked against the tensor's rows.
    let own = |k: usize, id: usize| -> Result<Option<u32>, VocabError> {
        match v.maps[models[k]][id] {
            Some(r) if (r as usize) < rows[k] => Ok(Some(r)),
            Some(r) => Err(VocabError::Tensor {
                tensor: tensor.to_string(),
                model: names[models[k]].clone(),
                message: format!(
                    "token {:?} has id {r} but the tensor has {} rows: the tokenizer and the weights disagree",
                    v.tokens[id], rows[k]
                ),
            }),
            None => Ok(None),
        }
    };
    let input_of = |m: usize, key: &str| -> Result<usize, VocabError> {
        models
            .iter()
            .position(|&x| x == m)
            .ok_or_else(|| VocabError::Key {
                key: key.to_string(),
                message: format!(
                    "takes a row of `{tensor}` from `{}`, which does not merge that tensor",
                    names[m]
                ),
            })
    };
    let configured: std::collections::HashMap<&str, usize> = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (t.as_str(), i))
        .collect();
    let mut maps = vec![RowMap::default(); models.len()];
    let mut averages: Vec<Vec<(u32, u32)>> = Vec::new();
    let mut present = Vec::with_capacity(models.len());
    for (id, token) in v.tokens.iter().enumerate() {
        present.clear();
        for k in 0..models.len() {
            present.push(own(k, id)?);
        }
        let cfg = configured.get(token.as_str()).map(|&i| &spec.tokens[i].1);
        let force = cfg.is_some_and(|c| c.force);
        let key = || format!("{}.tokens.{token}", spec.key);
        let default = if !force && present.iter().all(Option::is_some) {
            None
        } else if let Some(src) = cfg.and_then(|c| c.source.as_ref()) {
            Some(match src {
                TokenSource::Zero => Default::Zero,
                TokenSource::Model(m) => {
                    let k = input_of(*m, &format!("{}.source", key()))?;
                    match present[k] {
                        Some(r) => Default::Row(k as u32, r),
                        None => {
                            return Err(VocabError::Key {
                                key: format!("{}.source", key()),
                                message: format!(
                                    "`{}` does not have the token {token:?}; name another model or use `kind: model_token`",
                                    names[*m]
                                ),
                            })
                        }
                    }
                }
                TokenSource::ModelToken {
                    model,
                    token: which,
                } => {
                    let k = input_of(*model, &format!("{}.source.model", key()))?;
                    let row = match which {
                        TokenRef::Id(i) => *i,
                        TokenRef::Text(t) => match v.own[*model].get(t) {
                            Some(&i) => i as i64,
                            None => {
                                return Err(VocabError::Key {
                                    key: format!("{}.source.token", key()),
                                    message: format!(
                                        "`{}`'s tokenizer has no token {t:?}",
                                        names[*model]
                                    ),
                                })
                            }
                        },
                    };
                    if row < 0 || row as usize >= rows[k] {
                        return Err(VocabError::Key {
                            key: format!("{}.source.token_id", key()),
                            message: format!(
                                "id {row} is out of range: `{tensor}` of `{}` has {} rows",
                                names[*model], rows[k]
                            ),
                        });
                    }
                    Default::Row(k as u32, row as u32)
                }
            })
        } else if cfg.is_some() {
            // mergekit fails here (NotImplementedError): a listed token some model lacks
            // needs a source.
            return Err(VocabError::Key {
                key: key(),
                message: format!(
                    "{} of the models merging `{tensor}` lack this token: give it a `source` (a model, `kind: model_token` or `kind: zero`)",
                    present.iter().filter(|p| p.is_none()).count()
                ),
            });
        } else {
            let have: Vec<usize> = (0..models.len())
                .filter(|&k| present[k].is_some())
                .collect();
            Some(match (have.as_slice(), base) {
                ([], _) => Default::Zero,
                ([k], _) => Default::Row(*k as u32, present[*k].unwrap_or(0)),
                (_, Some(b)) if present[b].is_some() => {
                    Default::Row(b as u32, present[b].unwrap_or(0))
                }
                _ => Default::Average(
                    have.iter()
                        .map(|&k| (k as u32, present[k].unwrap_or(0)))
                        .collect(),
                ),
            })
        };
        let average = match &default {
            Some(Default::Average(pairs)) => {
                averages.push(pairs.clone());
                Some(averages.len() as u32 - 1)
            }
            _ => None,
        };
        for (k, map) in maps.iter_mut().enumerate() {
            let from = match (present[k], &default) {
                (Some(r), _) if !force => RowFrom::Rows {
                    input: k as u32,
                    row: r,
                },
                (_, Some(Default::Row(i, r))) => RowFrom::Rows { input: *i, row: *r },
                (_, Some(Default::Average(_))) => RowFrom::Average(average.unwrap_or(0)),
                _ => RowFrom::Zero,
            };
            map.push(id as u32, from);
        }
    }
    Ok(VocabTensor {
        rows: n,
        padded: v.padded,
        inputs: maps,
        averages,
        dtype,
    })
}

impl VocabTensor {
    /// Renumber inputs after the kernel reorders them: kernel input `j` is input `order[j]`.
    pub fn reorder(mut self, order: &[usize]) -> Self {
        let new_of = |old: u32| order.iter().position(|&o| o as u32 == old).unwrap_or(0) as u32;
        for map in &mut self.inputs {
            for run in &mut map.runs {
                if let RowFrom::Rows { input, row } = run.from {
                    run.from = RowFrom::Rows {
                        input: new_of(input),
                        row,
                    };
                }
            }
        }
        for pairs in &mut self.averages {
            for p in pairs.iter_mut() {
                p.0 = new_of(p.0);
            }
        }
        let mut inputs: Vec<Option<RowMap>> = self.inputs.into_iter().map(Some).collect();
        self.inputs = order
            .iter()
            .map(|&o| inputs[o].take().unwrap_or_default())
            .collect();
        self
    }

    /// Whether realigning changes nothing: every input keeps its own rows in order, there is
    /// no padding, and each input (`rows[k]` rows in `dtypes[k]`) is already what the
    /// kernel would be given. The common case of `tokenizer_source: base` over models that
    /// share a tokenizer: such a tensor is merged as if no vocabulary were merged (streamed,
    /// read once).
    pub fn is_identity(&self, rows: &[usize], dtypes: &[Dtype]) -> bool {
        self.padded == self.rows
            && self.inputs.iter().enumerate().all(|(k, m)| {
                rows[k] == self.rows
                    && dtypes[k] == self.dtype
                    && match m.runs.as_slice() {
                        [Run {
                            out: 0,
                            from: RowFrom::Rows { input, row: 0 },
                            ..
                        }] => *input as usize == k,
                        [] => self.rows == 0,
                        _ => false,
                    }
            })
    }

    /// Bytes of the realigned inputs (each `padded` rows in [`Self::dtype`]).
    pub fn gathered_bytes(&self, cols: usize) -> u64 {
        (self.inputs.len() * self.padded * cols * dtype::size(self.dtype).unwrap_or(4)) as u64
    }

    /// Realign every input: `values[k]` is input `k`'s whole tensor (its own rows, in its
    /// dtype), `cols` the elements per row. Returns each input's `padded` rows in
    /// [`Self::dtype`].
    pub fn gather(&self, values: &[(&[u8], Dtype)], cols: usize) -> Vec<Vec<u8>> {
        let g = self.dtype;
        let size = dtype::size(g).unwrap_or(4);
        let row_bytes = cols * size;
        // One row of input `k`, in the gathered dtype.
        let row = |k: u32, r: u32, out: &mut [u8]| {
            let (bytes, d) = values[k as usize];
            let s = dtype::size(d).unwrap_or(4);
            let src = &bytes[r as usize * cols * s..(r as usize + 1) * cols * s];
            if d == g {
                out.copy_from_slice(src);
            } else {
                for c in 0..cols {
                    let x = dtype::read_f64(src, d, c);
                    dtype::write_f64(out, g, c, x);
                }
            }
        };
        // Mean rows: zeros, plus each row in turn, divided by the count, rounded to the
        // dtype after every step (torch's arithmetic on a bfloat16/float16 tensor).
        let means: Vec<Vec<u8>> = self
            .averages
            .iter()
            .map(|pairs| {
                let mut acc = vec![0f64; cols];
                let mut one = vec![0u8; row_bytes];
                for &(k, r) in pairs {
                    row(k, r, &mut one);
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = round(g, op(g, *a, dtype::read_f64(&one, g, c), false));
                    }
                }
                let n = pairs.len() as f64;
                let mut out = vec![0u8; row_bytes];
                for (c, a) in acc.iter().enumerate() {
                    dtype::write_f64(&mut out, g, c, op(g, *a, n, true));
                }
                out
            })
            .collect();
        self.inputs
            .iter()
            .map(|map| {
                let mut out = vec![0u8; self.padded * row_bytes];
                for run in &map.runs {
                    for i in 0..run.len {
                        let at = (run.out + i) as usize * row_bytes;
                        let dst = &mut out[at..at + row_bytes];
                        match run.from {
                            RowFrom::Rows { input, row: r } => row(input, r + i, dst),
                            RowFrom::Average(a) => dst.copy_from_slice(&means[(a + i) as usize]),
                            RowFrom::Zero => dst.fill(0),
                        }
                    }
                }
                if self.padded > self.rows {
                    let mean = mean_row(&out[..self.rows * row_bytes], g, self.rows, cols);
                    for r in self.rows..self.padded {
                        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&mean);
                    }
                }
                out
            })
            .collect()
    }
}

/// `a + b` (`div` false) or `a / b` as torch computes it on a tensor of dtype `g`: in
/// float32 for the 16-bit dtypes and float32 (not in float64 then rounded: that would round
/// twice), in float64 for float64.
fn op(g: Dtype, a: f64, b: f64, div: bool) -> f64 {
    if g == Dtype::F64 {
        if div {
            a / b
        } else {
            a + b
        }
    } else {
        let (a, b) = (a as f32, b as f32);
        (if div { a / b } else { a + b }) as f64
    }
}

/// `x` rounded to dtype `g`.
fn round(g: Dtype, x: f64) -> f64 {
    let mut b = [0u8; 8];
    dtype::write_f64(&mut b, g, 0, x);
    dtype::read_f64(&b, g, 0)
}

/// `torch.mean(rows, dim=0)` of `rows` rows of `cols` elements in dtype `g`: float32 sums
/// in torch's order for a reduction over the outer axis, divided, rounded to `g`.
fn mean_row(data: &[u8], g: Dtype, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype::size(g).unwrap_or(4);
    let mut out = vec![0u8; cols * size];
    let mut column = vec![0f32; rows];
    for c in 0..cols {
        for (r, x) in column.iter_mut().enumerate() {
            *x = dtype::read_f64(data, g, r * cols + c) as f32;
        }
        let m = crate::merge::torch::mean(&column, c, cols);
        dtype::write_f64(&mut out, g, c, m as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TokenSpec, TokenizerSource};
    use crate::vocab::build::build;
    use crate::vocab::build::tests::{model, spec, tokenizer_json};

    fn names() -> Vec<String> {
        vec!["base".into(), "ft".into(), "other".into()]
    }

    /// base: a b c; ft: a b c <x>; other: c a (no b).
    fn vocab(tokens: Vec<(String, TokenSpec)>, pad: Option<usize>) -> Vocabulary {
        let base = model(&tokenizer_json(&["a", "b", "c"], &[], &[]), Some(3));
        let ft = model(
            &tokenizer_json(&["a", "b", "c", "<x>"], &[], &[("<x>", 3, true)]),
            Some(4),
        );
        let other = model(&tokenizer_json(&["c", "a"], &[], &[]), Some(2));
        let mut s = spec(TokenizerSource::Union, tokens);
        s.pad_to_multiple_of = pad;
        build(&s, 0, &[base, ft, other], &names()).unwrap()
    }

    fn rows_of(v: &VocabTensor, k: usize) -> Vec<RowFrom> {
        v.inputs[k]
            .runs
            .iter()
            .flat_map(|r| {
                (0..r.len).map(move |i| match r.from {
                    RowFrom::Rows { input, row } => RowFrom::Rows {
                        input,
                        row: row + i,
                    },
                    RowFrom::Average(a) => RowFrom::Average(a + i),
                    RowFrom::Zero => RowFrom::Zero,
                })
            })
            .collect()
    }

    #[test]
    fn missing_rows_come_from_the_donor_the_base_or_the_mean() {
        let v = vocab(vec![], None);
        assert_eq!(v.tokens, ["a", "b", "c", "<x>"]);
        let rows = |i, r| RowFrom::Rows { input: i, row: r };
        // With the base (input 0): b, which other lacks, is the base's row.
        let t = tensor_rows(
            &v,
            "e",
            &[0, 1, 2],
            &names(),
            &[3, 4, 2],
            Some(0),
            Dtype::BF16,
        )
        .unwrap();
        assert_eq!(
            rows_of(&t, 2),
            [rows(2, 1), rows(0, 1), rows(2, 0), rows(1, 3)]
        );
        assert_eq!(rows_of(&t, 0)[3], rows(1, 3), "only ft has <x>");
        assert!(t.averages.is_empty());
        // Without a base: the mean of the models that have b.
        let t = tensor_rows(&v, "e", &[0, 1, 2], &names(), &[3, 4, 2], None, Dtype::BF16).unwrap();
        assert_eq!(rows_of(&t, 2)[1], RowFrom::Average(0));
        assert_eq!(t.averages, [vec![(0, 1), (1, 1)]]);
        // Runs stay few: the base keeps its order.
        assert_eq!(t.inputs[0].runs.len(), 2);
        // Reordered for the kernel (ft first), every reference follows.
        let r = t.clone().reorder(&[1, 0, 2]);
        assert_eq!(
            rows_of(&r, 0),
            [rows(0, 0), rows(0, 1), rows(0, 2), rows(0, 3)]
        );
        assert_eq!(r.averages, [vec![(1, 1), (0, 1)]]);
    }

    #[test]
    fn a_realignment_that_changes_nothing_is_known_as_such() {
        let tok = || model(&tokenizer_json(&["a", "b", "c"], &[], &[]), Some(3));
        let two = &names()[..2];
        let v = build(
            &spec(TokenizerSource::Base, vec![]),
            0,
            &[tok(), tok()],
            two,
        )
        .unwrap();
        let t = tensor_rows(&v, "e", &[0, 1], two, &[3, 3], Some(0), Dtype::BF16).unwrap();
        assert!(t.is_identity(&[3, 3], &[Dtype::BF16, Dtype::BF16]));
        // Gathered in another dtype, or with other row counts: not the same.
        assert!(!t.is_identity(&[3, 3], &[Dtype::BF16, Dtype::F16]));
        assert!(!t.is_identity(&[3, 4], &[Dtype::BF16, Dtype::BF16]));
        let mut s = spec(TokenizerSource::Base, vec![]);
        s.pad_to_multiple_of = Some(4);
        let v = build(&s, 0, &[tok(), tok()], two).unwrap();
        let t = tensor_rows(&v, "e", &[0, 1], two, &[3, 3], Some(0), Dtype::BF16).unwrap();
        assert!(!t.is_identity(&[3, 3], &[Dtype::BF16, Dtype::BF16]));
        // The union with a model that has more tokens moves rows.
        let v = vocab(vec![], None);
        let t = tensor_rows(
            &v,
            "e",
            &[0, 1, 2],
            &names(),
            &[3, 4, 2],
            Some(0),
            Dtype::BF16,
        )
        .unwrap();
        assert!(!t.is_identity(&[3, 4, 2], &[Dtype::BF16; 3]));
    }

    #[test]
    fn configured_tokens_take_their_source_and_bad_ones_are_refused() {
        let cfg = |source, force| TokenSpec {
            source: Some(source),
            force,
        };
        let v = vocab(
            vec![
                ("a".into(), cfg(TokenSource::Model(2), true)),
                ("<z>".into(), cfg(TokenSource::Zero, false)),
                (
                    "<x>".into(),
                    cfg(
                        TokenSource::ModelToken {
                            model: 0,
                            token: TokenRef::Text("c".into()),
                        },
                        false,
                    ),
                ),
            ],
            Some(4),
        );
        assert_eq!(v.padded, 8);
        let t = tensor_rows(
            &v,
            "e",
            &[0, 1, 2],
            &names(),
            &[3, 4, 2],
            Some(0),
            Dtype::F32,
        )
        .unwrap();
        for k in 0..3 {
            let r = rows_of(&t, k);
            assert_eq!(
                r[0],
                RowFrom::Rows { input: 2, row: 1 },
                "forced from other"
            );
            assert_eq!(r[4], RowFrom::Zero);
        }
        assert_eq!(rows_of(&t, 0)[3], RowFrom::Rows { input: 0, row: 2 });
        assert_eq!(
            rows_of(&t, 1)[3],
            RowFrom::Rows { input: 1, row: 3 },
            "ft has <x>"
        );
        let refused = |spec: TokenSpec| {
            let v = vocab(vec![("<x>".into(), spec)], None);
            let three = [0, 1, 2];
            tensor_rows(&v, "e", &three, &names(), &[3, 4, 2], Some(0), Dtype::F32)
                .unwrap_err()
                .to_string()
        };
        let bad = |token| refused(cfg(TokenSource::ModelToken { model: 1, token }, false));
        let e = bad(TokenRef::Text("nope".into()));
        assert!(
            e.contains("`tokenizer.tokens.<x>.source.token`") && e.contains("ft"),
            "{e}"
        );
        let e = bad(TokenRef::Id(4));
        assert!(
            e.contains("`tokenizer.tokens.<x>.source.token_id`") && e.contains("4 rows"),
            "{e}"
        );
        let e = refused(TokenSpec {
            source: None,
            force: false,
        });
        assert!(
            e.contains("`tokenizer.tokens.<x>`") && e.contains("source"),
            "{e}"
        );
        // A model outside the tensor's merge cannot lend a row.
        let v = vocab(vec![("<x>".into(), cfg(TokenSource::Model(1), true))], None);
        let e = tensor_rows(&v, "e", &[0, 2], &names(), &[3, 2], Some(0), Dtype::F32).unwrap_err();
        assert!(e.to_string().contains("does not merge"), "{e}");
        // A tokenizer id past the tensor's rows.
        let e = tensor_rows(
            &v,
            "e",
            &[0, 1, 2],
            &names(),
            &[3, 3, 2],
            Some(0),
            Dtype::F32,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("ft") && e.to_string().contains("3 rows"),
            "{e}"
        );
    }

    #[test]
    fn gathered_rows_round_as_torch_and_padding_is_the_mean_row() {
        let bf = |x: f32| crate::dtype::bf16_round(x).to_bits().to_le_bytes()[2..].to_vec();
        let v = vocab(vec![], Some(3));
        // Inputs 0 and 1 (base, ft) with 2 columns; b averaged (no base).
        let t = tensor_rows(&v, "e", &[0, 1], &names()[..2], &[3, 4], None, Dtype::BF16).unwrap();
        let row = |xs: &[f32]| xs.iter().flat_map(|&x| bf(x)).collect::<Vec<u8>>();
        let base = [row(&[1.0, 2.0]), row(&[3.0, 1.0]), row(&[5.0, 0.5])].concat();
        let ft = [
            row(&[1.5, 2.0]),
            row(&[3.0078125, 1.0]),
            row(&[5.0, 0.5]),
            row(&[7.0, -1.0]),
        ]
        .concat();
        let out = t.gather(&[(&base, Dtype::BF16), (&ft, Dtype::BF16)], 2);
        assert_eq!(out[0].len(), 6 * 2 * 2);
        let at = |o: &[u8], r: usize, c: usize| crate::dtype::read_f64(o, Dtype::BF16, r * 2 + c);
        // Rows: a b c <x> then 2 padding rows; <x> from ft for the base.
        assert_eq!(at(&out[0], 3, 0), 7.0);
        assert_eq!(at(&out[1], 0, 0), 1.5);
        // b: (3.0 + 3.0078125) rounded to bfloat16 (6.0), then / 2.
        assert_eq!(at(&out[0], 1, 0), 3.0);
        // Padding: the mean of rows 0..4 of each input, in float32, rounded.
        let mean0 = ((1.0f32 + 3.0) + 5.0 + 7.0) / 4.0;
        assert_eq!(at(&out[0], 4, 0), mean0 as f64);
        assert_eq!(
            at(&out[0], 5, 1),
            ((2.0f32 + 1.0) + 0.5 + -1.0) as f64 / 4.0
        );
    }
}
