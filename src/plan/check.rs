//! The invariants every plan keeps, checked: property tests and the 671B-scale test check
//! plans with it.

use std::collections::HashMap;

use safetensors::Dtype;

use super::{
    part_target, split_parts, MergePlan, OutputFile, PlanOptions, Task, TensorJob, MAX_PARTS,
    MIN_PART,
};
use crate::fp8::SCALE_SUFFIX;

fn bytes(shape: &[usize], d: Dtype) -> u64 {
    shape.iter().product::<usize>() as u64 * (d.bitsize() / 8) as u64
}

/// What the walk over files has seen: tensor name -> file, and bytes written.
#[derive(Default)]
struct Seen<'a> {
    names: HashMap<String, &'a str>,
    total: u64,
}

impl MergePlan {
    /// The invariants every plan keeps, or the first one broken: tasks tile their files
    /// byte for byte after the header, every tensor is in exactly one task and one file
    /// (as the weight map says), sizes equal shape x dtype, input ranges lie inside their
    /// files (`input_size` gives a file's size), tasks are at least `opts.min_part` but a
    /// file's last, multipart parts tile each task and are at least S3's minimum (or
    /// `opts.min_part`, when smaller) but a file's last, at most [`MAX_PARTS`] a file, and
    /// files stay within `opts.out_shard_size` unless one tensor is bigger.
    pub fn check(
        &self,
        opts: &PlanOptions,
        input_size: impl Fn(usize) -> u64,
    ) -> Result<(), String> {
        let mut seen = Seen::default();
        let mut next_task = 0;
        for (fi, f) in self.files.iter().enumerate() {
            if f.tasks.start != next_task || f.tasks.is_empty() {
                return Err(format!("{}: tasks {:?} do not follow on", f.name, f.tasks));
            }
            next_task = f.tasks.end;
            self.check_file(fi, f, opts, &input_size, &mut seen)?;
        }
        if next_task != self.tasks.len() || self.tasks.iter().enumerate().any(|(i, t)| t.id != i) {
            return Err("task ids are not 0..n in file order".into());
        }
        if seen.total != self.total_size {
            return Err(format!(
                "total_size {} but the tensors hold {} bytes",
                self.total_size, seen.total
            ));
        }
        let mapped: HashMap<String, &str> = self
            .weight_map
            .iter()
            .map(|(t, f)| (t.clone(), f.as_str()))
            .collect();
        if mapped != seen.names || mapped.len() != self.weight_map.len() {
            return Err("the weight map does not list each tensor once, in its file".into());
        }
        Ok(())
    }

    /// File `fi`: its tasks tile it, its parts are few enough, it is within the shard size.
    fn check_file<'a>(
        &'a self,
        fi: usize,
        f: &'a OutputFile,
        opts: &PlanOptions,
        input_size: &impl Fn(usize) -> u64,
        seen: &mut Seen<'a>,
    ) -> Result<(), String> {
        let mut at = 0;
        let mut parts = 0;
        for t in &self.tasks[f.tasks.clone()] {
            if t.file != fi || t.out.start != at || t.out.end <= t.out.start {
                return Err(format!(
                    "task {} of {}: range {:?}, expected from {at}",
                    t.id, f.name, t.out
                ));
            }
            parts += check_parts(t, f, opts)?;
            let mut pos = if at == 0 { f.header.len() as u64 } else { at };
            for j in &t.tensors {
                pos = self.check_tensor(j, pos, f, input_size, seen)?;
            }
            if pos != t.out.end {
                return Err(format!(
                    "task {}: tensors end at {pos}, the task at {}",
                    t.id, t.out.end
                ));
            }
            at = t.out.end;
        }
        if at != f.size {
            return Err(format!("{}: tasks end at {at} of {} bytes", f.name, f.size));
        }
        if parts > MAX_PARTS {
            return Err(format!("{}: {parts} multipart parts", f.name));
        }
        let data = f.size - f.header.len() as u64;
        let tensors: usize = self.tasks[f.tasks.clone()]
            .iter()
            .map(|t| t.tensors.len())
            .sum();
        if data > opts.out_shard_size && tensors > 1 {
            return Err(format!(
                "{}: {data} bytes of data in {tensors} tensors, over the shard size",
                f.name
            ));
        }
        Ok(())
    }

    /// Tensor `j`, written from `pos` of file `f`: its output range, its scales, its inputs.
    /// Where the next tensor starts.
    fn check_tensor<'a>(
        &self,
        j: &TensorJob,
        pos: u64,
        f: &'a OutputFile,
        input_size: &impl Fn(usize) -> u64,
        seen: &mut Seen<'a>,
    ) -> Result<u64, String> {
        let scales_ok = j.requant.as_ref().is_none_or(|r| {
            r.scales.start == j.out.end && r.scales.end - r.scales.start == r.blocks.scale_bytes()
        });
        if j.out.start != pos || j.out.end - j.out.start != bytes(&j.shape, j.dtype) || !scales_ok {
            return Err(format!(
                "{}: output range {:?}, expected {} bytes from {pos}",
                j.name,
                j.out,
                bytes(&j.shape, j.dtype)
            ));
        }
        seen.total += j.written().end - j.written().start;
        if seen.names.insert(j.name.clone(), f.name.as_str()).is_some() {
            return Err(format!("{} is in two tasks", j.name));
        }
        if j.requant.is_some() {
            seen.names
                .insert(format!("{}{SCALE_SUFFIX}", j.name), f.name.as_str());
        }
        for s in j.inputs() {
            let file = self
                .inputs
                .get(s.file)
                .ok_or(format!("{}: no input file {}", j.name, s.file))?;
            if s.range.end > input_size(s.file) || s.len() != bytes(&j.shape, s.dtype) {
                return Err(format!(
                    "{}: input range {:?} of {} is outside the file or not shape x dtype",
                    j.name, s.range, file.url
                ));
            }
        }
        Ok(j.written().end)
    }
}

/// Task `t` of file `f` is at least the smallest part (unless it ends the file) and its
/// multipart parts tile it; how many parts it has.
fn check_parts(t: &Task, f: &OutputFile, opts: &PlanOptions) -> Result<u64, String> {
    let len = t.out.end - t.out.start;
    let last = t.out.end == f.size;
    if !last && len < opts.min_part {
        return Err(format!(
            "task {}: a {len}-byte part that is not its file's last",
            t.id
        ));
    }
    let (n, size) = split_parts(len, part_target(f.size));
    let tail = len - (n as u64 - 1) * size;
    let smallest = if n > 1 { tail.min(size) } else { len };
    if (n as u64 - 1) * size >= len || (!last && smallest < opts.min_part.min(MIN_PART)) {
        return Err(format!(
            "task {}: {n} parts of {size} bytes for {len}",
            t.id
        ));
    }
    Ok(n as u64)
}
