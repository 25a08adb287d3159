//! Merge-method parameters as mergekit 0.1.5 writes and resolves them.
//!
//! A parameter's setting is a scalar, a gradient (`[0.3, 0.1, 0.5]`, interpolated over the
//! layer position `t`), or a list of `{filter, value}` entries (the first whose filter is a
//! substring of the tensor name wins). Settings live at several levels (the model's own,
//! then the top level), and [`resolve`] picks the first level whose setting gives a value,
//! else the method's default; a required parameter with no value is an error naming the
//! model and tensor. Everything here is pure: the plan calls it once per tensor and input,
//! and kernels receive plain numbers.

use serde_yaml::Value;

/// A scalar as YAML gives it (mergekit keeps bools, numbers and strings apart until it
/// validates them against the parameter's type).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
    Text(String),
}

/// One parameter's setting at one level.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Scalar(Scalar),
    /// A gradient (numbers: interpolated) or a list of discrete values (picked by `t`).
    List(Vec<Scalar>),
    /// `[{filter, value}, ...]`: the first matching entry's value (a scalar or a list).
    Filtered(Vec<(Option<String>, Setting)>),
}

/// A level's settings, in the order written.
pub type Params = Vec<(String, Setting)>;

/// The type a method declares for a parameter; values are checked against it as mergekit's
/// pydantic does (lax mode: `"0.5"` is a float, `1` is `true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
    Int,
}

/// Who a parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value per tensor (it sees the output tensor's name).
    Shared,
    /// One value per input, the base included.
    Input,
    /// One value per input but the base.
    NonBase,
}

/// A method's parameter: name, type, scope, and default (`None`: required).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Option<f64>,
}

impl ParamDef {
    pub const fn shared(name: &'static str, kind: Kind, default: f64) -> Self {
        ParamDef {
            name,
            kind,
            scope: Scope::Shared,
            default: Some(default),
        }
    }
    pub const fn per_input(name: &'static str, scope: Scope, default: Option<f64>) -> Self {
        ParamDef {
            name,
            kind: Kind::Float,
            scope,
            default,
        }
    }
}

/// Read a setting from its YAML value; `key` names it in errors.
pub fn parse_setting(v: &Value, key: &str) -> Result<Setting, String> {
    match v {
        Value::Sequence(items) if items.iter().any(|i| matches!(i, Value::Mapping(_))) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Value::Mapping(_) = item else {
                    return Err(format!(
                        "`{key}[{i}]` is a plain value in a list of `{{filter, value}}` entries"
                    ));
                };
                out.push(conditional(item, &format!("{key}[{i}]"))?);
            }
            Ok(Setting::Filtered(out))
        }
        Value::Mapping(_) => Ok(Setting::Filtered(vec![conditional(v, key)?])),
        Value::Sequence(items) if items.is_empty() => Err(format!(
            "`{key}` is an empty list: give a value, a gradient of numbers, or `{{filter, value}}` entries"
        )),
        Value::Sequence(items) => Ok(Setting::List(
            items
                .iter()
                .enumerate()
                .map(|(i, s)| scalar(s, &format!("{key}[{i}]")))
                .collect::<Result<_, _>>()?,
        )),
        Value::Tagged(t) => parse_setting(&t.value, key),
        other => Ok(Setting::Scalar(scalar(other, key)?)),
    }
}

fn conditional(v: &Value, key: &str) -> Result<(Option<String>, Setting), String> {
    let Value::Mapping(m) = v else {
        unreachable!("called on mappings")
    };
    for (k, _) in m {
        if !matches!(k.as_str(), Some("filter" | "value")) {
            return Err(format!(
                "`{key}` has the key `{}`; an entry holds `filter` and `value`",
                crate::config::yaml_key(k)
            ));
        }
    }
    let filter = match m.get("filter") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(format!("`{key}.filter` must be a string")),
    };
    let value = match m.get("value") {
        None => return Err(format!("`{key}` has no `value`")),
        Some(Value::Sequence(items)) if items.is_empty() => {
            return Err(format!("`{key}.value` is an empty list"))
        }
        Some(Value::Sequence(items)) => Setting::List(
            items
                .iter()
                .enumerate()
                .map(|(i, s)| scalar(s, &format!("{key}.value[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => Setting::Scalar(scalar(other, &format!("{key}.value"))?),
    };
    Ok((filter, value))
}

fn scalar(v: &Value, key: &str) -> Result<Scalar, String> {
    match v {
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::Number(n) => n
            .as_f64()
            .map(Scalar::Num)
            .ok_or_else(|| format!("`{key}`: {n} is not a number mergekit can read")),
        Value::String(s) => Ok(Scalar::Text(s.clone())),
        Value::Tagged(t) => scalar(&t.value, key),
        _ => Err(format!(
            "`{key}` must be a number, true/false, a list of numbers (a gradient) or a list of `{{filter, value}}` entries"
        )),
    }
}

/// A scalar checked against the parameter's type, as a number (`true` is 1).
fn validate(kind: Kind, s: &Scalar) -> Result<f64, String> {
    let text_bool = |t: &str| match t.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" | "t" | "y" => Some(true),
        "false" | "no" | "off" | "0" | "f" | "n" => Some(false),
        _ => None,
    };
    match (kind, s) {
        (Kind::Bool, Scalar::Bool(b)) => Ok(f64::from(u8::from(*b))),
        (Kind::Bool, Scalar::Num(n)) if *n == 0.0 || *n == 1.0 => Ok(*n),
        (Kind::Bool, Scalar::Text(t)) if text_bool(t).is_some() => {
            Ok(f64::from(u8::from(text_bool(t) == Some(true))))
        }
        (Kind::Bool, _) => Err(format!("{} is not true or false", show(s))),
        (_, Scalar::Bool(b)) => Ok(f64::from(u8::from(*b))),
        (Kind::Float, Scalar::Num(n)) => Ok(*n),
        (Kind::Int, Scalar::Num(n)) if n.fract() == 0.0 => Ok(*n),
        (Kind::Float | Kind::Int, Scalar::Text(t)) => match t.trim().parse::<f64>() {
            Ok(n) if kind == Kind::Float || n.fract() == 0.0 => Ok(n),
            _ => Err(format!("{} is not a number", show(s))),
        },
        (Kind::Int, Scalar::Num(_)) => Err(format!("{} is not a whole number", show(s))),
    }
}

fn show(s: &Scalar) -> String {
    match s {
        Scalar::Num(n) => n.to_string(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Text(t) => format!("`{t}`"),
    }
}

/// mergekit's `evaluate_setting`: the value of `setting` for the tensor `name` at layer
/// position `t`, or `None` when no filter matches (the next level is asked).
pub fn evaluate(kind: Kind, setting: &Setting, name: &str, t: f64) -> Result<Option<f64>, String> {
    match setting {
        Setting::Scalar(s) => validate(kind, s).map(Some),
        Setting::List(items) if items.is_empty() => Ok(None),
        Setting::List(items) => {
            let values = items
                .iter()
                .map(|s| validate(kind, s))
                .collect::<Result<Vec<_>, _>>()?;
            // Validated values are numbers unless the parameter is a boolean, which picks.
            if kind == Kind::Bool {
                return Ok(Some(values[(t * (values.len() - 1) as f64) as usize]));
            }
            // Python's float arithmetic, as mergekit interpolates.
            let scaled = t * (values.len() - 1) as f64;
            let i0 = scaled as usize;
            let i1 = (values.len() - 1).min(i0 + 1);
            let frac = scaled - i0 as f64;
            let v = (1.0 - frac) * values[i0] + frac * values[i1];
            if kind == Kind::Int && v.fract() != 0.0 {
                return Err(format!("the gradient gives {v} here, not a whole number"));
            }
            Ok(Some(v))
        }
        Setting::Filtered(entries) => {
            for (filter, value) in entries {
                let matches = match filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !name.is_empty() && name.contains(f),
                };
                if matches {
                    return evaluate(kind, value, name, t);
                }
            }
            Ok(None)
        }
    }
}

/// Where a value came from, for `plan` and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Level `i` of the levels given to [`resolve`].
    Level(usize),
    Default,
}

/// A parameter that cannot be resolved for a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("missing required parameter `{param}` for `{model}` (tensor `{tensor}`): set it under the model's `parameters` or the top-level `parameters`")]
    Missing {
        param: &'static str,
        model: String,
        tensor: String,
    },
    #[error("parameter `{param}` for tensor `{tensor}`: {message}")]
    Invalid {
        param: &'static str,
        tensor: String,
        message: String,
    },
}

/// The value of `def` for tensor `name` at position `t`: the first of `levels` (highest
/// precedence first) whose setting gives a value, else the default. `model` names the
/// input in errors (empty for a shared parameter).
pub fn resolve(
    def: &ParamDef,
    levels: &[&Params],
    name: &str,
    t: f64,
    model: &str,
) -> Result<(f64, Origin), ParamError> {
    for (i, level) in levels.iter().enumerate() {
        // mergekit keeps the last of repeated keys (a dict).
        if let Some((_, setting)) = level.iter().rev().find(|(k, _)| k == def.name) {
            let v =
                evaluate(def.kind, setting, name, t).map_err(|message| ParamError::Invalid {
                    param: def.name,
                    tensor: name.to_string(),
                    message,
                })?;
            if let Some(v) = v {
                return Ok((v, Origin::Level(i)));
            }
        }
    }
    match def.default {
        Some(v) => Ok((v, Origin::Default)),
        None => Err(ParamError::Missing {
            param: def.name,
            model: if model.is_empty() {
                "the merge".into()
            } else {
                model.to_string()
            },
            tensor: name.to_string(),
        }),
    }
}

/// The position of a tensor among the layers, as mergekit computes it for a gradient:
/// `idx / (layers - 1)` for a tensor of layer `idx` (1 when there is one layer), 0 for the
/// tensors before and after the layers (embeddings, final norm, head).
pub fn layer_t(layer: Option<usize>, layers: usize) -> f64 {
    match layer {
        None => 0.0,
        Some(_) if layers <= 1 => 1.0,
        Some(i) => i as f64 / (layers - 1) as f64,
    }
}

/// The layer a tensor belongs to: the first all-digit component of its dotted name
/// (`model.layers.12.mlp.up_proj.weight` -> 12), as in every decoder layout mergekit's
/// architecture files describe (`model.layers.N`, `transformer.h.N`, `gpt_neox.layers.N`).
pub fn layer_of(name: &str) -> Option<usize> {
    name.split('.')
        .find(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(yaml: &str) -> Setting {
        parse_setting(&serde_yaml::from_str(yaml).unwrap(), "p").unwrap()
    }

    #[test]
    fn gradients_interpolate_as_python_does() {
        let g = setting("[0.2, 0.5, 0.9]");
        // 4 layers: t = 0, 1/3, 2/3, 1 (mergekit's m_slerp_gradient golden: 0.2, 0.4,
        // 0.6333..., 0.9).
        let got: Vec<f64> = (0..4)
            .map(|i| {
                evaluate(Kind::Float, &g, "x", layer_t(Some(i), 4))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let py = |t: f64| {
            let scaled: f64 = t * 2.0;
            let i0 = scaled as usize;
            let frac = scaled - i0 as f64;
            let v = [0.2, 0.5, 0.9];
            (1.0 - frac) * v[i0] + frac * v[(i0 + 1).min(2)]
        };
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.to_bits(), py(i as f64 / 3.0).to_bits());
        }
        assert_eq!(got[0], 0.2);
        assert_eq!(got[3], 0.9);
        assert!((got[2] - 0.6333333333333333).abs() < 1e-15);
        assert_eq!(evaluate(Kind::Float, &g, "x", 0.0).unwrap(), Some(0.2));
    }

    #[test]
    fn filters_take_the_first_substring_match_and_fall_through() {
        let s = setting(
            "[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0, 1]}, {value: 0.5}]",
        );
        assert_eq!(
            evaluate(
                Kind::Float,
                &s,
                "model.layers.0.self_attn.q_proj.weight",
                0.0
            )
            .unwrap(),
            Some(0.3)
        );
        assert_eq!(
            evaluate(Kind::Float, &s, "model.layers.0.mlp.up_proj.weight", 1.0).unwrap(),
            Some(1.0)
        );
        assert_eq!(
            evaluate(Kind::Float, &s, "model.norm.weight", 0.0).unwrap(),
            Some(0.5)
        );
        let none = setting("[{filter: mlp, value: 1}]");
        assert_eq!(
            evaluate(Kind::Float, &none, "lm_head.weight", 0.0).unwrap(),
            None
        );
        let single = setting("{filter: mlp, value: 0.25}");
        assert_eq!(
            evaluate(Kind::Float, &single, "a.mlp.b", 0.0).unwrap(),
            Some(0.25)
        );
    }

    #[test]
    fn values_are_checked_against_the_type() {
        assert_eq!(
            evaluate(Kind::Bool, &setting("true"), "x", 0.0).unwrap(),
            Some(1.0)
        );
        assert_eq!(
            evaluate(Kind::Bool, &setting("0"), "x", 0.0).unwrap(),
            Some(0.0)
        );
        assert!(evaluate(Kind::Bool, &setting("0.5"), "x", 0.0).is_err());
        assert_eq!(
            evaluate(Kind::Float, &setting("'0.5'"), "x", 0.0).unwrap(),
            Some(0.5)
        );
        assert_eq!(
            evaluate(Kind::Float, &setting("true"), "x", 0.0).unwrap(),
            Some(1.0)
        );
        assert!(evaluate(Kind::Float, &setting("abc"), "x", 0.0).is_err());
        assert!(evaluate(Kind::Int, &setting("2.5"), "x", 0.0).is_err());
        // A boolean list picks by position rather than interpolating.
        let b = setting("[true, false]");
        assert_eq!(evaluate(Kind::Bool, &b, "x", 0.4).unwrap(), Some(1.0));
        assert_eq!(evaluate(Kind::Bool, &b, "x", 1.0).unwrap(), Some(0.0));
        assert!(parse_setting(
            &serde_yaml::from_str("[{filter: a, value: 1}, 2]").unwrap(),
            "p"
        )
        .is_err());
        assert!(
            parse_setting(&serde_yaml::from_str("{filter: a, valeu: 1}").unwrap(), "p").is_err()
        );
    }

    #[test]
    fn precedence_then_default_then_required() {
        let def = ParamDef::per_input("weight", Scope::NonBase, None);
        let own: Params = vec![("weight".into(), setting("[{filter: mlp, value: 0.7}]"))];
        let top: Params = vec![("weight".into(), setting("0.4"))];
        let r = |name: &str, levels: &[&Params]| resolve(&def, levels, name, 0.0, "m");
        assert_eq!(
            r("a.mlp.w", &[&own, &top]).unwrap(),
            (0.7, Origin::Level(0))
        );
        assert_eq!(
            r("a.attn.w", &[&own, &top]).unwrap(),
            (0.4, Origin::Level(1))
        );
        let err = r("a.attn.w", &[&own]).unwrap_err().to_string();
        assert!(
            err.contains("`weight`") && err.contains("`m`") && err.contains("a.attn.w"),
            "{err}"
        );
        let dens = ParamDef::per_input("density", Scope::NonBase, Some(1.0));
        assert_eq!(
            resolve(&dens, &[&own], "x", 0.0, "m").unwrap(),
            (1.0, Origin::Default)
        );
    }

    #[test]
    fn layers_and_positions() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("transformer.h.3.attn.c_attn.weight"), Some(3));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_t(None, 32), 0.0);
        assert_eq!(layer_t(Some(0), 1), 1.0);
        assert_eq!(layer_t(Some(31), 32), 1.0);
    }
}
