//! Laying the tensors out as mergekit does (lexicographic order, greedy sharding by bytes,
//! safetensors' in-file order and header) and cutting them into tasks.

use safetensors::tensor::TensorInfo;

use safetensors::Dtype;

use super::{InputFile, MergePlan, OutputFile, PlanError, PlanOptions, Task, TensorJob};
use crate::dtype;
use crate::fp8::SCALE_SUFFIX;

/// Bytes a tensor takes in its file: its data, and its scales when written as FP8.
pub(super) fn tensor_bytes(j: &TensorJob) -> u64 {
    let scales = j.requant.as_ref().map_or(0, |r| r.blocks.scale_bytes());
    j.numel() as u64 * dtype::size(j.dtype).expect("whole-byte dtype") as u64 + scales
}

/// Shard the tensors (already in lexicographic order) into files and tasks.
pub(super) fn layout(
    jobs: Vec<TensorJob>,
    inputs: Vec<InputFile>,
    warnings: Vec<String>,
    opts: PlanOptions,
) -> Result<MergePlan, PlanError> {
    let total_size: u64 = jobs.iter().map(tensor_bytes).sum();
    let groups = shard(jobs, opts.out_shard_size);
    let k = groups.len();
    let mut files = Vec::with_capacity(k);
    let mut tasks: Vec<Task> = Vec::new();
    let mut weight_map = Vec::new();
    for (fi, mut group) in groups.into_iter().enumerate() {
        let name = if k == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", fi + 1, k)
        };
        // safetensors' order inside a file: by dtype, widest first, then by name.
        group.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let header = file_header(&group)?;
        let data_start = header.len() as u64;
        for j in &group {
            weight_map.push((j.name.clone(), name.clone()));
            if j.requant.is_some() {
                weight_map.push((format!("{}{SCALE_SUFFIX}", j.name), name.clone()));
            }
        }
        let first_task = tasks.len();
        let data = cut_tasks(group, fi, data_start, opts, &mut tasks);
        files.push(OutputFile {
            name,
            size: data_start + data,
            header,
            tasks: first_task..tasks.len(),
        });
    }
    for (i, t) in tasks.iter_mut().enumerate() {
        t.id = i;
    }
    weight_map.sort();
    Ok(MergePlan {
        inputs,
        files,
        tasks,
        weight_map,
        total_size,
        warnings,
        layers: Vec::new(),
    })
}

/// Greedy sharding, as mergekit's TensorWriter: start a new file when this tensor would
/// push a non-empty file past `limit`.
fn shard(jobs: Vec<TensorJob>, limit: u64) -> Vec<Vec<TensorJob>> {
    let mut groups: Vec<Vec<TensorJob>> = Vec::new();
    let mut cur = 0u64;
    for j in jobs {
        let b = tensor_bytes(&j);
        match groups.last_mut() {
            Some(g) if cur + b <= limit => {
                g.push(j);
                cur += b;
            }
            _ => {
                groups.push(vec![j]);
                cur = b;
            }
        }
    }
    groups
}

/// The header of a file holding `group`, in order.
fn file_header(group: &[TensorJob]) -> Result<Vec<u8>, PlanError> {
    let mut off = 0u64;
    let mut infos = Vec::with_capacity(group.len());
    for j in group {
        let b = j.numel() as u64 * dtype::size(j.dtype).expect("whole-byte dtype") as u64;
        infos.push((
            j.name.clone(),
            TensorInfo {
                dtype: j.dtype,
                shape: j.shape.clone(),
                data_offsets: (off as usize, (off + b) as usize),
            },
        ));
        off += b;
        if let Some(r) = &j.requant {
            // Each scale right after its weight, so one task writes both.
            let s = r.blocks.scale_bytes();
            infos.push((
                format!("{}{SCALE_SUFFIX}", j.name),
                TensorInfo {
                    dtype: Dtype::F32,
                    shape: r.blocks.scale_shape().to_vec(),
                    data_offsets: (off as usize, (off + s) as usize),
                },
            ));
            off += s;
        }
    }
    crate::header::write_header(infos).map_err(PlanError::Layout)
}

/// Place `group`'s tensors after the header of file `file` and cut them into tasks of about
/// `opts.task_size` input bytes (at least `opts.min_part` output bytes, a multipart part's
/// minimum), appended to `tasks`. The file's first task starts at 0 and writes the header;
/// a file of empty tensors still gets one task for it. Returns the bytes of data.
fn cut_tasks(
    group: Vec<TensorJob>,
    file: usize,
    data_start: u64,
    opts: PlanOptions,
    tasks: &mut Vec<Task>,
) -> u64 {
    let first_task = tasks.len();
    let mut pos = 0u64;
    let mut cur_task: Option<Task> = None;
    for mut j in group {
        let b = tensor_bytes(&j);
        let end = data_start + pos + b;
        match &mut j.requant {
            Some(r) => {
                let scales = r.blocks.scale_bytes();
                r.scales = end - scales..end;
                j.out = data_start + pos..end - scales;
            }
            None => j.out = data_start + pos..end,
        }
        pos += b;
        let fits = cur_task.as_ref().is_some_and(|t| {
            t.input_bytes() + j.input_bytes() <= opts.task_size
                || t.out.end - t.out.start < opts.min_part
        });
        if !fits {
            tasks.extend(cur_task.take());
            let start = if tasks.len() == first_task {
                0
            } else {
                j.written().start
            };
            cur_task = Some(Task {
                id: 0,
                file,
                out: start..start,
                tensors: Vec::new(),
            });
        }
        let t = cur_task.as_mut().expect("task open");
        t.out.end = j.written().end;
        t.tensors.push(j);
    }
    tasks.extend(cur_task.take());
    if tasks.len() == first_task {
        tasks.push(Task {
            id: 0,
            file,
            out: 0..data_start,
            tensors: Vec::new(),
        });
    }
    pos
}
