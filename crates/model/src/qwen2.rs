//! The Qwen2 language model over input embeddings, with caller-owned KV caches and one forward
//! pass for many sequences of different lengths (a ragged batch).

use crate::attention::{ChunkQueries, ContextRows};
use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::kv_pool::{BlockTable, DisjointRows, KvPool};
use crate::layers::{softmax_f32, with_f32_values, RmsNorm, RowNorm};
use crate::linear::{Linear, LinearFormat, MlpActivation};
use crate::paged::HostKv;
use crate::weights::Scope;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Queries are processed in blocks of at most this many rows, so a long prompt never
/// materialises its full `T x T` score matrix...
const QUERY_BLOCK: usize = 512;
/// ...and fewer when the context is long: one block's scores (all heads) stay under this many
/// bytes. A 16-frame video (11,664 tokens) then works in blocks of 51 rows, 33 MB of scores,
/// where its full matrix would be 16 x 11,664^2 x 4 bytes = 8.7 GB.
const SCORE_BLOCK_BYTES: usize = 32 << 20;
/// New tokens from which a sequence's attention runs on the bf16 GEMM (see `attention.rs`).
const BF16_ATTENTION_MIN_ROWS: usize = 32;

/// One sequence's share of a forward pass.
pub struct SeqInput<'a> {
    /// Embeddings of the new tokens, `[t, hidden]`; their positions continue from `past`.
    pub embeds: Tensor,
    /// Tokens of this sequence already in the pool.
    pub past: usize,
    /// The pool blocks holding its tokens in order: enough for `past + t` (the new tokens are
    /// written into them).
    pub blocks: &'a [u32],
    /// Whether to return logits for this sequence's last new token (false for non-final
    /// prefill chunks, whose logits nobody reads).
    pub want_logits: bool,
}

/// Each new token's position in its sequence, for one forward pass: as values (the CPU's
/// rotary pass) and as a tensor (candle's rope), made once for every layer.
struct Positions {
    ids: Vec<u32>,
    tensor: Tensor,
}

/// Rotary embedding tables, computed in f32 for every position of the context.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &TextConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)) as f32).collect();
        let positions = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        Ok(Rotary { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// The fused projection's output `[t, (heads + 2 kv_heads) * head_dim]` (rows at
    /// `positions`) as heads-first queries and keys, rotated, and values: `[heads, t, hd]`,
    /// `[kv_heads, t, hd]` twice. On the CPU in f32 in one pass over the rows (the same
    /// arithmetic as candle's `rope`); candle's transpose, copy and rope elsewhere.
    fn split_heads(
        &self,
        projected: &Tensor,
        heads: usize,
        kv_heads: usize,
        positions: &Positions,
    ) -> Result<[Tensor; 3]> {
        let hd = self.cos.dim(1)? * 2;
        let total = projected.dim(0)?;
        let all = heads + 2 * kv_heads;
        if !(projected.device().is_cpu() && projected.dtype() == DType::F32) {
            let all_heads = projected.reshape((total, all, hd))?;
            let heads_first = |first: usize, n: usize| -> Result<Tensor> {
                Ok(all_heads.narrow(1, first, n)?.transpose(0, 1)?.contiguous()?)
            };
            let q = self.apply(&heads_first(0, heads)?, &positions.tensor)?;
            let k = self.apply(&heads_first(heads, kv_heads)?, &positions.tensor)?;
            return Ok([q, k, heads_first(heads + kv_heads, kv_heads)?]);
        }
        // Token by token (each projected row read once, in order; head by head, the rows were
        // read 12 KiB apart and took twice as long), into a buffer written once, never zeroed.
        let mut out: Vec<f32> = Vec::with_capacity(all * total * hd);
        let heads_out = DisjointRows(out.spare_capacity_mut().as_mut_ptr());
        with_f32_values(&self.cos, |cos| {
            with_f32_values(&self.sin, |sin| {
                with_f32_values(projected, |rows| {
                    (0..total).into_par_iter().with_min_len(8).for_each(|t| {
                        let half = hd / 2;
                        let position = positions.ids[t] as usize;
                        let (cos, sin) = (&cos[position * half..][..half], &sin[position * half..][..half]);
                        for (head, x) in rows[t * all * hd..][..all * hd].chunks_exact(hd).enumerate() {
                            // SAFETY: row t of `head` lies inside the buffer's capacity, and this
                            // iteration alone writes it.
                            let out = unsafe { heads_out.row((head * total + t) * hd, hd) };
                            if head >= heads + kv_heads {
                                out.iter_mut().zip(x).for_each(|(o, &x)| _ = o.write(x));
                                continue;
                            }
                            // As zipped halves (no index to check), so that the loop runs
                            // sixteen lanes at a time: indexed, it ran a value at a time (2.4%
                            // of a 16-prompt prefill).
                            let ((x1, x2), (out1, out2)) = (x.split_at(half), out.split_at_mut(half));
                            let pairs = out1.iter_mut().zip(out2).zip(x1.iter().zip(x2));
                            for (((o1, o2), (&x1, &x2)), (&cos, &sin)) in pairs.zip(cos.iter().zip(sin)) {
                                o1.write(x1 * cos - x2 * sin);
                                o2.write(x1 * sin + x2 * cos);
                            }
                        }
                    })
                })
            })
        })???;
        // SAFETY: every row of every head was written above.
        unsafe { out.set_len(all * total * hd) };
        let out = Tensor::from_vec(out, (all, total, hd), projected.device())?;
        Ok([out.narrow(0, 0, heads)?, out.narrow(0, heads, kv_heads)?, out.narrow(0, heads + kv_heads, kv_heads)?])
    }

    /// Rotates `x`: `[heads, t, head_dim]` whose rows sit at `positions`.
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let xf = x.to_dtype(DType::F32)?.unsqueeze(0)?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope(&xf, &cos, &sin)?.squeeze(0)?.to_dtype(dtype)?)
    }
}

struct Attention {
    /// The query, key and value projections as one product (outputs in that order).
    qkv: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(scope: &Scope, cfg: &TextConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        Ok(Attention {
            qkv: Linear::load_fused(
                &[
                    (scope.pp("q_proj"), cfg.num_attention_heads * hd),
                    (scope.pp("k_proj"), cfg.num_key_value_heads * hd),
                    (scope.pp("v_proj"), cfg.num_key_value_heads * hd),
                ],
                h,
                true,
            )?,
            o: Linear::load(&scope.pp("o_proj"), cfg.num_attention_heads * hd, h, false)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// Whether a chunk of `rows` new tokens runs on the bf16 attention kernels (prefill chunks
    /// where they run; a decode step's one row is cheaper on candle than packing the whole cache).
    fn uses_bf16_kernels(&self, rows: usize, device: &Device) -> bool {
        rows >= BF16_ATTENTION_MIN_ROWS && crate::attention::bf16_available(&self.qkv, device)
    }

    /// `x` plus attention over `norm(x)`: `[T, hidden]` for all sequences; `batch` says where
    /// each sequence's rows, blocks and mask are.
    fn forward_adding(
        &self,
        layer: usize,
        x: &Tensor,
        norm: &RmsNorm,
        batch: &Batch,
        rotary: &Rotary,
        pool: &KvPool,
    ) -> Result<Tensor> {
        let residual = x;
        let qkv = self.qkv.forward_normed(x, norm)?;
        let [q, k, v] = rotary.split_heads(&qkv, self.heads, self.kv_heads, &batch.positions)?;
        for (seq, &(start, len)) in batch.seqs.iter().zip(&batch.spans) {
            let table = BlockTable { blocks: seq.blocks, len: seq.past };
            pool.write(layer, table, &k.narrow(1, start, len)?, &v.narrow(1, start, len)?)?;
        }
        // A chunk with no past on an f32 pool attends over its own keys and values where the
        // projection left them (the pool holds the same bits), rather than gathering them back.
        let fresh_rows = pool.dtype() == DType::F32 && k.device().is_cpu() && k.dtype() == DType::F32;
        with_f32_values_if(fresh_rows, &k, |k_rows| {
            with_f32_values_if(fresh_rows, &v, |v_rows| {
                self.attend_then_project(layer, x, &q, k_rows.zip(v_rows), batch, pool, residual)
            })
        })??
    }

    /// Every sequence's attention, then the output projection added to `residual`; `fresh`
    /// holds all the chunk's keys and values as f32 rows `[kv_heads, T, hd]` where they can be
    /// borrowed. On the CPU each sequence writes its rows of the projection's input `[T, heads *
    /// hd]` where they belong, its queries read where the rotation left them (the copies of
    /// every query, and of every output twice into that layout, were 5% of a 16-prompt prefill).
    #[allow(clippy::too_many_arguments)]
    fn attend_then_project(
        &self,
        layer: usize,
        x: &Tensor,
        q: &Tensor,
        fresh: Option<(&[f32], &[f32])>,
        batch: &Batch,
        pool: &KvPool,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (total, hd, width) = (x.dim(0)?, self.head_dim, self.heads * self.head_dim);
        if !(x.device().is_cpu() && q.dtype() == DType::F32) {
            let outputs = (0..batch.seqs.len())
                .into_par_iter()
                .map(|i| {
                    self.attend_as_tensor(layer, &q.narrow(1, batch.spans[i].0, batch.spans[i].1)?, i, batch, pool)
                })
                .collect::<Result<Vec<_>>>()?;
            // [heads, T, hd] -> [T, heads * hd]
            let ctx = Tensor::cat(&outputs, 1)?.transpose(0, 1)?.reshape((total, width))?;
            return self.o.forward_adding(&ctx, residual);
        }
        // Every value is written below, by the one sequence whose row it is.
        let mut ctx = vec![0.0f32; total * width];
        let rows = DisjointRows(ctx.as_mut_ptr());
        with_f32_values(q, |queries| {
            // Sequences attend in parallel: a decode step's attention is one small product per
            // sequence and head, and one thread doing all of them left the others idle.
            (0..batch.seqs.len()).into_par_iter().try_for_each(|i| {
                let (seq, (start, len)) = (&batch.seqs[i], batch.spans[i]);
                let out = ContextRows { rows, first: start, width };
                if batch.on_candle[i].is_none() && self.uses_bf16_kernels(len, x.device()) {
                    let chunk = ChunkQueries { values: queries, total, first: start, rows: len, hd };
                    let table = BlockTable { blocks: seq.blocks, len: seq.past + len };
                    let block = query_block_rows(self.heads, table.len);
                    let kv = match fresh {
                        Some((keys, values)) if seq.past == 0 => {
                            let (keys, values) =
                                (Cow::Borrowed(&keys[start * hd..]), Cow::Borrowed(&values[start * hd..]));
                            HostKv { keys, values, kv_heads: self.kv_heads, len, head_stride: total }
                        }
                        _ => crate::paged::gather_f32(pool, layer, table, hd).ok_or_else(unreadable_pool)?,
                    };
                    crate::attention::causal_bf16(chunk, &kv, seq.past, block, out);
                    return Ok(());
                }
                let heads_first = self.attend_as_tensor(layer, &q.narrow(1, start, len)?, i, batch, pool)?;
                with_f32_values(&heads_first, |values| {
                    for (h, head) in values.chunks_exact(len * hd).enumerate() {
                        for (r, row) in head.chunks_exact(hd).enumerate() {
                            // SAFETY: row `start + r` belongs to this sequence alone.
                            unsafe { out.head_row(r, h, hd) }.copy_from_slice(row);
                        }
                    }
                })
            })
        })??;
        let ctx = Tensor::from_vec(ctx, (total, width), x.device())?;
        self.o.forward_adding(&ctx, residual)
    }

    /// Sequence `i`'s attention where the bf16 kernels do not run it, `[heads, len, hd]` from its
    /// queries `q`: a decode step reading the pool in place, or candle's operations.
    fn attend_as_tensor(&self, layer: usize, q: &Tensor, i: usize, batch: &Batch, pool: &KvPool) -> Result<Tensor> {
        let (seq, (_, len)) = (&batch.seqs[i], batch.spans[i]);
        let table = BlockTable { blocks: seq.blocks, len: seq.past + len };
        match &batch.on_candle[i] {
            None => crate::paged::decode(q, pool, layer, table)?.ok_or_else(unreadable_pool),
            // The device path: the sequence's blocks gathered by candle, then its attention.
            Some(CandleAttention { block_ids, mask }) => {
                let (keys, values) = pool.gather(layer, block_ids, table.len)?;
                let block = query_block_rows(self.heads, table.len);
                causal_attention(q, &keys, &values, mask.as_ref(), self.kv_heads, block)
            }
        }
    }
}

fn unreadable_pool() -> ModelError {
    ModelError::Input("the KV pool cannot be read in place here".into())
}

/// `f` with `t`'s f32 values if `wanted` (see [`with_f32_values`]), with `None` otherwise.
fn with_f32_values_if<R>(wanted: bool, t: &Tensor, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
    match wanted {
        true => with_f32_values(t, |values| f(Some(values))),
        false => Ok(f(None)),
    }
}

/// Attention of `q` (`[heads, t, hd]`, at positions `past..past + t`) over `keys`/`values`
/// (`[kv_heads, past + t, hd]`), under `mask` (`[t, past + t]`, from [`causal_mask`]; none
/// when every query sees every key). Query heads that share a KV head are folded into one
/// batch row, so grouped-query attention never copies the cache.
fn causal_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    kv_heads: usize,
    block: usize,
) -> Result<Tensor> {
    // Scores in f32 whatever the run dtype: f16 scores of a few tens already lose hundredths,
    // which the softmax turns into percent-level errors (torch's attention accumulates in f32 too).
    let dtype = q.dtype();
    let (q, keys, values) = (q.to_dtype(DType::F32)?, keys.to_dtype(DType::F32)?, values.to_dtype(DType::F32)?);
    let (heads, t, hd) = q.dims3()?;
    let group = heads / kv_heads;
    let kv_len = keys.dim(1)?;
    let scale = (hd as f64).powf(-0.5);
    let keys_t = keys.t()?;
    let mut blocks = Vec::with_capacity(t.div_ceil(block));
    for block_start in (0..t).step_by(block) {
        let rows = block.min(t - block_start);
        let qb = q.narrow(1, block_start, rows)?.reshape((kv_heads, group * rows, hd))?;
        let scores = (qb.matmul(&keys_t)? * scale)?;
        let scores = match mask {
            // Row r of each group is query r, so the [rows, kv_len] mask repeats per group.
            Some(mask) => scores
                .reshape((kv_heads, group, rows, kv_len))?
                .broadcast_add(&mask.narrow(0, block_start, rows)?)?
                .reshape((kv_heads, group * rows, kv_len))?,
            None => scores,
        };
        let probs = softmax_f32(&scores)?;
        blocks.push(probs.matmul(&values)?.reshape((heads, rows, hd))?);
    }
    Ok(Tensor::cat(&blocks, 1)?.to_dtype(dtype)?)
}

/// Query rows per attention block for `heads` heads over `kv_len` keys.
fn query_block_rows(heads: usize, kv_len: usize) -> usize {
    (SCORE_BLOCK_BYTES / (heads * kv_len * 4).max(1)).clamp(1, QUERY_BLOCK)
}

/// `[rows, kv_len]` additive mask for queries at absolute positions `first..first + rows`;
/// `None` when every query may see every key (a single decode token).
fn causal_mask(rows: usize, kv_len: usize, first: usize, device: &Device) -> Result<Option<Tensor>> {
    if first + rows >= kv_len && rows == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..kv_len).map(move |c| if c <= first + r { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (rows, kv_len), device)?))
}

/// The dtype a KV cache stores on the CPU: bf16 for 8- and 4-bit weights, f16 for bf16
/// weights, the activations' dtype otherwise (and on GPUs). A decode step reads every cached
/// key and value of every running sequence (the 0.5b keeps 16 heads of 64 in 24 layers, 192 KiB
/// a token in f32: 16 streams of 100 tokens read 315 MB a step, a third of its weights' bytes;
/// one image's 749 tokens 147 MB), so 16 bits halve that traffic and the memory per token. The
/// quantized formats already trade exactness for speed, and their documented bounds hold with
/// bf16 (parity: 0.32 and 0.20 on the tiny fixtures, against 0.35). bf16 weights need f16's
/// three more mantissa bits: a bf16 cache moved their logprobs past the bound of 0.05; with an
/// f16 one the tiny fixtures' largest difference is 0.0419 with the AVX2 kernels, 0.0438 with
/// AVX-512 BF16 and with AMX, against 0.0395, 0.0314 and 0.0425 with an f32 cache. Writes saturate at f16's range. f32 weights keep f32: exact.
fn kv_cache_dtype(format: LinearFormat, activations: DType, device: &Device) -> DType {
    match format {
        LinearFormat::Q8_0 | LinearFormat::Q4K if device.is_cpu() => DType::BF16,
        LinearFormat::Bf16 if device.is_cpu() => DType::F16,
        _ => activations,
    }
}

struct Mlp {
    /// The gate and up projections as one product (gate first).
    gate_up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(scope: &Scope, cfg: &TextConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_up: Linear::load_fused(&[(scope.pp("gate_proj"), i), (scope.pp("up_proj"), i)], h, false)?,
            down: Linear::load(&scope.pp("down_proj"), i, h, false)?,
        })
    }

    /// `x` plus the MLP of `norm(x)`.
    fn forward_adding(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        self.gate_up.mlp_adding(x, norm, MlpActivation::SiluGated, &self.down, x)
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// Where each sequence of one forward pass is, made once for every layer.
struct Batch<'a, 'b> {
    seqs: &'b [SeqInput<'a>],
    /// `(start, len)` of each sequence's rows in the batch.
    spans: Vec<(usize, usize)>,
    positions: Positions,
    /// For each sequence whose attention runs on candle's operations rather than reading the
    /// pool in place, what they need (`None` for the others).
    on_candle: Vec<Option<CandleAttention>>,
}

/// What candle's attention needs for one sequence, made once for every layer (on a GPU, one
/// upload per step).
struct CandleAttention {
    /// The sequence's block table on the model's device, to gather its keys and values.
    block_ids: Tensor,
    /// Its causal mask (none for a single query, which sees every key).
    mask: Option<Tensor>,
}

/// The Qwen2 decoder and its output head.
pub struct Qwen2 {
    /// In the checkpoint's bf16 when the linear layers run bf16 weights (rows are widened to
    /// the run dtype as they are looked up: 1.25 GB less for the 7b's 152000 x 4096 table),
    /// in the run dtype otherwise.
    embed_tokens: Tensor,
    /// The dtype activations run in.
    dtype: DType,
    /// The dtype the KV cache stores (see [`kv_cache_dtype`]).
    kv_dtype: DType,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    cfg: TextConfig,
}

impl Qwen2 {
    /// `model` holds the decoder (`embed_tokens`, `layers`, `norm`); `lm_head` the output head,
    /// absent in checkpoints with tied embeddings. The KV cache stores `kv_dtype`, or where that
    /// is `None` what [`kv_cache_dtype`] picks for the weights.
    pub fn load(model: &Scope, lm_head: &Scope, cfg: &TextConfig, kv_dtype: Option<DType>) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let embed = model.pp("embed_tokens");
        let shape = [cfg.vocab_size, h];
        let keep_bf16 = model.linear_format() == LinearFormat::Bf16 && embed.stored_dtype("weight")? == DType::BF16;
        let embed_tokens =
            if keep_bf16 { embed.get_as("weight", &shape, DType::BF16)? } else { embed.get("weight", &shape)? };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = model.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_norm: RmsNorm::load(&l.pp("input_layernorm"), h, eps)?,
                    attn: Attention::load(&l.pp("self_attn"), cfg)?,
                    post_norm: RmsNorm::load(&l.pp("post_attention_layernorm"), h, eps)?,
                    mlp: Mlp::load(&l.pp("mlp"), cfg)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(&model.pp("norm"), h, eps)?;
        let lm_head = if lm_head.contains("weight") {
            Linear::load(lm_head, h, cfg.vocab_size, false)?
        } else {
            Linear::new(embed_tokens.to_dtype(model.dtype())?, None, lm_head.linear_format())?
        };
        let rotary = Rotary::new(cfg, embed_tokens.device())?;
        let dtype = model.dtype();
        let kv_dtype = kv_dtype.unwrap_or_else(|| kv_cache_dtype(model.linear_format(), dtype, embed_tokens.device()));
        Ok(Qwen2 { embed_tokens, dtype, kv_dtype, layers, norm, lm_head, rotary, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        let ids = Tensor::new(ids, self.embed_tokens.device())?;
        Ok(self.embed_tokens.index_select(&ids, 0)?.to_dtype(self.dtype)?)
    }

    /// The KV pool for this model: `num_blocks` blocks of `block_size` tokens in every layer.
    pub fn new_kv_pool(&self, num_blocks: usize, block_size: usize) -> Result<KvPool> {
        let heads = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        KvPool::new(
            self.cfg.num_hidden_layers,
            heads,
            self.kv_dtype,
            self.embed_tokens.device(),
            (num_blocks, block_size),
        )
    }

    /// Bytes of KV one token costs across all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers
            * self.cfg.num_key_value_heads
            * self.cfg.head_dim
            * self.kv_dtype.size_in_bytes()
    }

    /// Runs every sequence's new tokens through the decoder in one pass and returns the logits
    /// (`[k, vocab]`, f32) of the last new token of each sequence with `want_logits`, in order.
    /// The new tokens' keys and values are written into each sequence's blocks of `pool`.
    pub fn forward(&self, pool: &mut KvPool, seqs: &[SeqInput]) -> Result<Option<Tensor>> {
        if seqs.is_empty() {
            return Ok(None);
        }
        let mut spans = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        let mut start = 0;
        for seq in seqs.iter() {
            let t = seq.embeds.dim(0)?;
            let past = seq.past;
            if t == 0 {
                return Err(ModelError::Input("a sequence in the batch has no new tokens".into()));
            }
            if past + t > self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "{} tokens exceed the model's context of {}",
                    past + t,
                    self.cfg.max_position_embeddings
                )));
            }
            spans.push((start, t));
            positions.extend((past..past + t).map(|p| p as u32));
            start += t;
        }
        let positions =
            Positions { tensor: Tensor::new(positions.as_slice(), self.embed_tokens.device())?, ids: positions };
        // Attention reads the pool in place on the CPU for the bf16 kernels' prefill chunks and
        // for f32 decode steps; every other sequence runs on candle's operations.
        let device = self.embed_tokens.device();
        let in_place = |t: usize| {
            let kernels = self.layers.first().is_some_and(|l| l.attn.uses_bf16_kernels(t, device));
            crate::paged::host_rows(pool) && (kernels || (t == 1 && self.dtype == DType::F32))
        };
        let on_candle = seqs
            .iter()
            .zip(&spans)
            .map(|(seq, &(_, t))| {
                if in_place(t) {
                    return Ok(None);
                }
                let block_ids = Tensor::new(seq.blocks, device)?;
                Ok(Some(CandleAttention { block_ids, mask: causal_mask(t, seq.past + t, seq.past, device)? }))
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = Batch { seqs, spans, positions, on_candle };
        let pool = &*pool;
        let embeds: Vec<Tensor> = seqs.iter().map(|s| s.embeds.clone()).collect();
        let mut x = Tensor::cat(&embeds, 0)?.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.attn.forward_adding(i, &x, &layer.input_norm, &batch, &self.rotary, pool)?;
            x = layer.mlp.forward_adding(&h, &layer.post_norm)?;
        }
        let last_rows: Vec<u32> = seqs
            .iter()
            .zip(&batch.spans)
            .filter(|(s, _)| s.want_logits)
            .map(|(_, &(start, len))| (start + len - 1) as u32)
            .collect();
        if last_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(last_rows, x.device())?;
        let last = self.norm.forward(&x.index_select(&rows, 0)?)?;
        Ok(Some(self.lm_head.forward(&last)?.to_dtype(DType::F32)?.contiguous()?))
    }
}

#[cfg(test)]
mod tests {
    use super::{causal_attention, causal_mask, query_block_rows, Positions, Rotary};
    use crate::config::TextConfig;
    use candle_core::{Device, Tensor};

    /// The CPU's one pass over the fused projection (token by token, into an unzeroed buffer)
    /// gives candle's heads-first copies and rope exactly, at positions out of order.
    #[test]
    fn split_heads_on_the_cpu_is_candles_rope() {
        let dev = Device::Cpu;
        let cfg = TextConfig {
            vocab_size: 8,
            hidden_size: 32,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
        };
        let rotary = Rotary::new(&cfg, &dev).unwrap();
        let (heads, kv_heads, hd, total) = (4, 2, 8, 21);
        let projected = Tensor::randn(0f32, 1.0, (total, (heads + 2 * kv_heads) * hd), &dev).unwrap();
        let ids: Vec<u32> = (0..total as u32).map(|t| (t * 7 + 3) % 64).collect();
        let positions = Positions { tensor: Tensor::new(ids.as_slice(), &dev).unwrap(), ids };
        let [q, k, v] = rotary.split_heads(&projected, heads, kv_heads, &positions).unwrap();
        let all_heads = projected.reshape((total, heads + 2 * kv_heads, hd)).unwrap();
        let heads_first = |first: usize, n: usize| {
            all_heads.narrow(1, first, n).unwrap().transpose(0, 1).unwrap().contiguous().unwrap()
        };
        let want = [
            rotary.apply(&heads_first(0, heads), &positions.tensor).unwrap(),
            rotary.apply(&heads_first(heads, kv_heads), &positions.tensor).unwrap(),
            heads_first(heads + kv_heads, kv_heads),
        ];
        for (got, want) in [q, k, v].iter().zip(&want) {
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "largest difference {diff}");
        }
    }

    #[test]
    fn block_size_does_not_change_attention() {
        let dev = Device::Cpu;
        // 4 query heads sharing 2 KV heads; 7 new queries after 5 cached positions.
        let q = Tensor::randn(0f32, 1.0, (4, 7, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 12, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 12, 8), &dev).unwrap();
        let mask = causal_mask(7, 12, 5, &dev).unwrap();
        let whole = causal_attention(&q, &k, &v, mask.as_ref(), 2, 512).unwrap();
        for block in [1, 2, 3] {
            let blocked = causal_attention(&q, &k, &v, mask.as_ref(), 2, block).unwrap();
            let diff = (&whole - &blocked).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "block {block}: {diff}");
        }
    }

    #[test]
    fn mask_lets_each_query_see_its_past_only() {
        let m = causal_mask(2, 4, 2, &Device::Cpu).unwrap().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0, 0.0]);
        assert!(causal_mask(1, 5, 4, &Device::Cpu).unwrap().is_none());
    }

    #[test]
    fn long_contexts_use_smaller_query_blocks() {
        assert_eq!(query_block_rows(14, 100), 512);
        // 16 video frames with the 0.5b model's 14 heads: about 33 MB of scores per block.
        let rows = query_block_rows(14, 11_664);
        assert_eq!(rows, 51);
        assert!(14 * rows * 11_664 * 4 <= 32 << 20);
        assert_eq!(query_block_rows(64, 1 << 20), 1);
    }
}
