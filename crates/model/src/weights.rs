//! Safetensors weights of a checkpoint: memory-mapped, single or sharded, in either name layout.

use crate::error::{ModelError, Result};
use crate::linear::LinearFormat;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Told the bytes of weights read so far and the checkpoint's total, after each tensor.
pub type LoadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Which naming convention the checkpoint uses, for reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    /// The llava-hf repositories (and what transformers 5 writes back on save):
    /// `language_model.model.*`, `language_model.lm_head`, `vision_tower[.vision_model].*`.
    Hub,
    /// transformers >= 4.52 in memory: `model.language_model.*`, `model.vision_tower.*`, `lm_head`.
    Transformers5,
}

/// Where each part of the network lives in the file's tensor names, found by probing for a
/// tensor every checkpoint has, so that all published variants load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameLayout {
    pub kind: LayoutKind,
    pub language_model: &'static str,
    pub lm_head: &'static str,
    pub vision_tower: &'static str,
    pub projector: &'static str,
}

impl NameLayout {
    fn detect(has: impl Fn(&str) -> bool) -> Option<Self> {
        let probe =
            |candidates: &[&'static str], leaf: &str| candidates.iter().copied().find(|p| has(&format!("{p}.{leaf}")));
        let language_model = probe(&["model.language_model", "language_model.model"], "embed_tokens.weight")?;
        let vision_tower = probe(
            &["model.vision_tower.vision_model", "model.vision_tower", "vision_tower.vision_model", "vision_tower"],
            "embeddings.patch_embedding.weight",
        )?;
        let projector = probe(&["model.multi_modal_projector", "multi_modal_projector"], "linear_1.weight")?;
        let lm_head = probe(&["lm_head", "language_model.lm_head"], "weight")
            .unwrap_or(if language_model.starts_with("model.") { "lm_head" } else { "language_model.lm_head" });
        let kind = if language_model.starts_with("model.") { LayoutKind::Transformers5 } else { LayoutKind::Hub };
        Some(NameLayout { kind, language_model, lm_head, vision_tower, projector })
    }
}

struct Store {
    files: Vec<(String, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    dtype: DType,
    device: Device,
    linear: LinearFormat,
    progress: Option<LoadProgress>,
    /// Bytes of all tensors in the files, and of those read so far.
    total_bytes: u64,
    read_bytes: AtomicU64,
}

/// All tensors of a checkpoint directory, converted to the run dtype as they are read.
#[derive(Clone)]
pub struct Weights {
    store: Arc<Store>,
    pub layout: NameLayout,
}

impl Weights {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(
        dir: &Path,
        dtype: DType,
        device: &Device,
        linear: LinearFormat,
        progress: Option<LoadProgress>,
    ) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> =
            if index_path.exists() { shard_names(&index_path)? } else { vec!["model.safetensors".to_string()] };
        let mut files = Vec::with_capacity(file_names.len());
        let mut index = HashMap::new();
        let mut total_bytes = 0u64;
        for name in file_names {
            let path: PathBuf = dir.join(&name);
            if !path.exists() {
                return Err(ModelError::file(path, "not found"));
            }
            // SAFETY: the mapping is read-only; the checkpoint must not be modified while it is mapped.
            let st = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| ModelError::file(&path, format!("not a valid safetensors file ({e})")))?;
            for (tensor, view) in st.tensors() {
                total_bytes += view.data().len() as u64;
                index.insert(tensor, files.len());
            }
            files.push((name, st));
        }
        let layout = NameLayout::detect(|name| index.contains_key(name)).ok_or_else(|| {
            ModelError::file(
                dir.join(&files[0].0),
                "is not a llava checkpoint: expected `language_model.model.embed_tokens.weight` or \
                 `model.language_model.embed_tokens.weight`, a vision tower's `embeddings.patch_embedding.weight` \
                 and `multi_modal_projector.linear_1.weight`",
            )
        })?;
        let store = Store {
            files,
            index,
            dtype,
            device: device.clone(),
            linear,
            progress,
            total_bytes,
            read_bytes: AtomicU64::new(0),
        };
        Ok(Weights { store: Arc::new(store), layout })
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
    /// How linear layers hold their weights.
    pub fn linear_format(&self) -> LinearFormat {
        self.store.linear
    }
    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// A view of the tensors under `prefix.`.
    pub fn scope(&self, prefix: &str) -> Scope {
        Scope { weights: self.clone(), prefix: prefix.to_string() }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.index.contains_key(name)
    }

    /// Loads `name`, checks its shape, and converts it to the run dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.store.dtype)
    }

    /// The dtype `name` is stored in.
    pub fn stored_dtype(&self, name: &str) -> Result<DType> {
        let &file = self.store.index.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        Ok(DType::try_from(self.store.files[file].1.get(name)?.dtype())?)
    }

    /// Like [`Weights::get`] but converted to `dtype`.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let store = &self.store;
        let &file = store.index.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        let (file_name, st) = &store.files[file];
        let view = st.get(name)?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                file: file_name.clone(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let tensor =
            st.load(name, &store.device).map_err(|e| ModelError::file(file_name, format!("tensor `{name}`: {e}")))?;
        release_pages(view.data());
        if let Some(progress) = &store.progress {
            let read =
                store.read_bytes.fetch_add(view.data().len() as u64, Ordering::Relaxed) + view.data().len() as u64;
            progress(read, store.total_bytes);
        }
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// Tells the kernel that the mapped pages of a tensor just copied out are not needed any more.
/// They are clean file pages, so nothing is lost, but until the mapping is dropped they count
/// in the process's resident memory: loading a 16 GB checkpoint otherwise peaked at 24 GB of
/// RSS on a 24 GiB machine, the copies plus the mapped shards.
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let start = (data.as_ptr() as usize).div_ceil(page) * page;
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside a read-only, file-backed mapping that this process
            // owns; MADV_DONTNEED on it only drops cached pages, which a later read faults back
            // in from the file, so no data the program can observe changes.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

/// Reads the shard list of a sharded checkpoint, in a stable order.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::file(index_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::file(index_path, e))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::file(index_path, "missing the `weight_map` object"))?;
    let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(ModelError::file(index_path, "`weight_map` names no files"));
    }
    Ok(names)
}

/// A prefix into [`Weights`], in the style of candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Scope {
    weights: Weights,
    prefix: String,
}

impl Scope {
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope {
        Scope { weights: self.weights.clone(), prefix: format!("{}.{name}", self.prefix) }
    }
    pub fn name(&self, leaf: &str) -> String {
        format!("{}.{leaf}", self.prefix)
    }
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&self.name(leaf), shape)
    }
    pub fn get_as(&self, leaf: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.weights.get_as(&self.name(leaf), shape, dtype)
    }
    pub fn stored_dtype(&self, leaf: &str) -> Result<DType> {
        self.weights.stored_dtype(&self.name(leaf))
    }
    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(&self.name(leaf))
    }
    pub fn dtype(&self) -> DType {
        self.weights.dtype()
    }
    pub fn linear_format(&self) -> LinearFormat {
        self.weights.linear_format()
    }
}
