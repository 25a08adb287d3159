//! The gRPC contract (`proto/mergefleet/v1/cluster.proto`) and its conversion to domain types.
//!
//! prost types stop here: the coordinator turns a [`plan::Task`] into a wire task, and the
//! worker turns it back into a [`plan::Task`] plus the input URLs it needs, so the planner,
//! the executor and the kernel never see a protobuf type.

use safetensors::Dtype;

use crate::dtype::{self, WorkDtype};
use crate::merge::Reductions;
use crate::plan::{InputFile, InputSlice, MergePlan, ModelStockParams, Op, Task, TensorJob};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("mergefleet.v1");
}

/// Bumped on any incompatible change of the contract; checked at registration.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest gRPC message either side accepts (a task lists every input range of its
/// tensors; 64 MiB is far above any real task).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A wire message that does not describe a valid task.
#[derive(Debug, thiserror::Error)]
#[error("malformed task from the coordinator: {0}")]
pub struct WireError(pub String);

fn parse_dtype(s: &str) -> Result<Dtype, WireError> {
    dtype::parse(s).ok_or_else(|| WireError(format!("unknown dtype `{s}`")))
}

fn parse_work(s: &str) -> Result<WorkDtype, WireError> {
    WorkDtype::from_name(s).ok_or_else(|| WireError(format!("unknown working dtype `{s}`")))
}

/// Task `id` of `plan` as sent to a worker, for its `attempt`, writing to `output`. The
/// output file's header rides with the file's first task.
pub fn task_to_wire(plan: &MergePlan, id: usize, attempt: u32, output: pb::Output) -> pb::Task {
    let task = &plan.tasks[id];
    let file = &plan.files[task.file];
    let header = (task.out.start == 0).then_some(file.header.as_slice());
    let inputs = &plan.inputs;
    let slice = |s: &InputSlice| pb::InputRange {
        url: inputs[s.file].url.clone(),
        start: s.range.start,
        end: s.range.end,
        dtype: dtype::name(s.dtype),
    };
    pb::Task {
        task_id: task.id as u64,
        attempt,
        out_start: task.out.start,
        out_end: task.out.end,
        header: header.map(<[u8]>::to_vec).unwrap_or_default(),
        tensors: task
            .tensors
            .iter()
            .map(|j| {
                let (kernel, inputs) = match &j.op {
                    Op::Merge { kernel, inputs } => (
                        Some(pb::KernelParams {
                            work_dtype: kernel.work.name().into(),
                            out_dtype: kernel.out.name().into(),
                            filter_wise: kernel.filter_wise,
                            reductions: kernel.reductions.name().into(),
                        }),
                        inputs.iter().map(slice).collect(),
                    ),
                    Op::Copy { input } => (None, vec![slice(input)]),
                };
                pb::TensorJob {
                    name: j.name.clone(),
                    shape: j.shape.iter().map(|&d| d as u64).collect(),
                    dtype: dtype::name(j.dtype),
                    out_start: j.out.start,
                    out_end: j.out.end,
                    kernel,
                    inputs,
                }
            })
            .collect(),
        output: Some(output),
        file_name: file.name.clone(),
    }
}

/// A task as a worker receives it.
#[derive(Debug)]
pub struct Received {
    pub task: Task,
    /// The input files the task's slices index.
    pub inputs: Vec<InputFile>,
    /// The file header, when the task starts its file.
    pub header: Option<Vec<u8>>,
}

/// A wire task back as a plan task, with the input files its slices index.
pub fn task_from_wire(t: &pb::Task) -> Result<Received, WireError> {
    let mut files: Vec<InputFile> = Vec::new();
    let mut file_of = |url: &str| -> usize {
        match files.iter().position(|f| f.url == url) {
            Some(i) => i,
            None => {
                files.push(InputFile {
                    model: 0,
                    url: url.to_string(),
                });
                files.len() - 1
            }
        }
    };
    let mut tensors = Vec::with_capacity(t.tensors.len());
    for j in &t.tensors {
        let mut slices = Vec::with_capacity(j.inputs.len());
        for r in &j.inputs {
            if r.end < r.start {
                return Err(WireError(format!(
                    "tensor `{}`: input range {}..{}",
                    j.name, r.start, r.end
                )));
            }
            slices.push(InputSlice {
                file: file_of(&r.url),
                range: r.start..r.end,
                dtype: parse_dtype(&r.dtype)?,
            });
        }
        let op = match &j.kernel {
            Some(k) => {
                if slices.len() < 3 {
                    return Err(WireError(format!(
                        "tensor `{}`: model_stock needs a base and two fine-tunes",
                        j.name
                    )));
                }
                Op::Merge {
                    kernel: ModelStockParams {
                        work: parse_work(&k.work_dtype)?,
                        out: parse_work(&k.out_dtype)?,
                        filter_wise: k.filter_wise,
                        reductions: Reductions::from_name(&k.reductions).ok_or_else(|| {
                            WireError(format!(
                                "tensor `{}`: unknown reduction order `{}`",
                                j.name, k.reductions
                            ))
                        })?,
                    },
                    inputs: slices,
                }
            }
            None => Op::Copy {
                input: slices.into_iter().next().ok_or_else(|| {
                    WireError(format!("tensor `{}`: a copy without input", j.name))
                })?,
            },
        };
        tensors.push(TensorJob {
            name: j.name.clone(),
            shape: j.shape.iter().map(|&d| d as usize).collect(),
            dtype: parse_dtype(&j.dtype)?,
            out: j.out_start..j.out_end,
            op,
        });
    }
    let task = Task {
        id: t.task_id as usize,
        file: 0,
        out: t.out_start..t.out_end,
        tensors,
    };
    let header = (!t.header.is_empty()).then(|| t.header.clone());
    Ok(Received {
        task,
        inputs: files,
        header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MergeConfig;
    use crate::plan::{plan, PlanOptions};
    use crate::source::{ModelSource, SourceFile, TensorLoc};
    use crate::store::Stores;

    #[test]
    fn round_trip_keeps_the_task() {
        let stores = Stores::new();
        let model = |name: &str| {
            let location = stores.resolve(&format!("/m/{name}")).unwrap();
            let mut tensors = std::collections::BTreeMap::new();
            tensors.insert(
                "a".into(),
                TensorLoc {
                    file: 0,
                    dtype: Dtype::BF16,
                    shape: vec![2, 3],
                    start: 8,
                    end: 20,
                },
            );
            tensors.insert(
                "ids".into(),
                TensorLoc {
                    file: 0,
                    dtype: Dtype::I64,
                    shape: vec![2],
                    start: 20,
                    end: 36,
                },
            );
            ModelSource {
                reference: name.into(),
                files: vec![SourceFile {
                    path: location.child("model.safetensors"),
                    url: location.child_display("model.safetensors"),
                    size: 36,
                }],
                location,
                tensors,
            }
        };
        let cfg = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        let p = plan(
            &cfg,
            &[model("base"), model("a"), model("b")],
            PlanOptions::default(),
        )
        .unwrap();
        let t = &p.tasks[0];
        let out = pb::Output {
            target: Some(pb::output::Target::LocalPath("/x".into())),
        };
        let w = task_to_wire(&p, 0, 3, out);
        assert_eq!(w.file_name, p.files[0].name);
        assert_eq!(w.attempt, 3);
        let Received {
            task: back,
            inputs: files,
            header,
        } = task_from_wire(&w).unwrap();
        assert_eq!(header.as_deref(), Some(&p.files[0].header[..]));
        assert_eq!(back.out, t.out);
        assert_eq!(back.tensors.len(), t.tensors.len());
        for (a, b) in back.tensors.iter().zip(&t.tensors) {
            assert_eq!(
                (&a.name, &a.shape, a.dtype, &a.out),
                (&b.name, &b.shape, b.dtype, &b.out)
            );
            match (&a.op, &b.op) {
                (
                    Op::Merge {
                        kernel: ka,
                        inputs: ia,
                    },
                    Op::Merge {
                        kernel: kb,
                        inputs: ib,
                    },
                ) => {
                    assert_eq!(ka, kb);
                    for (x, y) in ia.iter().zip(ib) {
                        assert_eq!(files[x.file].url, p.inputs[y.file].url);
                        assert_eq!((&x.range, x.dtype), (&y.range, y.dtype));
                    }
                }
                (Op::Copy { input: x }, Op::Copy { input: y }) => {
                    assert_eq!(files[x.file].url, p.inputs[y.file].url)
                }
                _ => panic!("op changed"),
            }
        }
        let mut bad = w.clone();
        bad.tensors[0].dtype = "Q9".into();
        assert!(task_from_wire(&bad).unwrap_err().to_string().contains("Q9"));
    }
}
