//! The work of one step once it is planned: gather image features (vision cache or one batched
//! encode), embed each chunk, one ragged forward pass, then sample and stream every sequence
//! that produced logits.

use crate::engine::Engine;
use crate::request::{Event, FinishReason, Timing, Usage};
use crate::sampling::first_argmax_rows;
use crate::sequence::{Emitted, Scores};
use candle_core::{CpuStorage, Storage, Tensor};
use std::borrow::Cow;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use weft_model::SeqInput;

impl Engine {
    /// Ensures the projected features of every image overlapping `[from, to)` of the prompt
    /// are at hand: from the request, the vision cache, or one batched encode.
    fn gather_features(&mut self, wanted: &[(u64, usize, usize)]) -> weft_model::Result<()> {
        let tpi = self.model.config().tokens_per_image();
        let mut missing: Vec<(u64, usize)> = Vec::new();
        for &(req_id, from, to) in wanted {
            let req = self.requests.get_mut(&req_id).expect("live");
            for (k, &start) in req.image_starts.iter().enumerate() {
                if start < to && start + tpi > from && req.features[k].is_none() {
                    match self.vision.get(req.images[k].hash) {
                        Some(f) => req.features[k] = Some(f),
                        None => missing.push((req_id, k)),
                    }
                }
            }
        }
        for batch in missing.chunks(self.config.max_images_per_encode.max(1)) {
            let pixels: Vec<Tensor> = batch.iter().map(|(r, k)| self.requests[r].images[*k].pixels.clone()).collect();
            let started = Instant::now();
            let features = self.model.encode_images(&Tensor::stack(&pixels, 0)?)?;
            let elapsed = started.elapsed();
            self.stats.vision_encode_us.fetch_add(elapsed.as_micros() as u64, Relaxed);
            let mut encoded_for: Vec<u64> = batch.iter().map(|(r, _)| *r).collect();
            encoded_for.dedup();
            for r in encoded_for {
                self.requests.get_mut(&r).expect("live").vision_s += elapsed.as_secs_f64();
            }
            self.stats.images_encoded.fetch_add(batch.len() as u64, Relaxed);
            for (i, (r, k)) in batch.iter().enumerate() {
                let f = features.get(i)?;
                let req = self.requests.get_mut(r).expect("live");
                self.vision.insert(req.images[*k].hash, f.clone());
                req.features[*k] = Some(f);
            }
        }
        self.stats.vision_cache_hits.store(self.vision.hits, Relaxed);
        self.stats.vision_cache_misses.store(self.vision.misses, Relaxed);
        Ok(())
    }

    /// Embeddings of `seq.tokens[from..to]`, image slots filled from the features.
    fn chunk_embeddings(&self, id: u64, from: usize, to: usize) -> weft_model::Result<Tensor> {
        let seq = &self.seqs[&id];
        let req = &self.requests[&seq.req_id];
        let tpi = self.model.config().tokens_per_image();
        let mut rows = Vec::new();
        for (k, &start) in req.image_starts.iter().enumerate() {
            let (a, b) = (from.max(start), to.min(start + tpi));
            if a < b {
                let f = req.features[k].as_ref().expect("gathered before embedding");
                rows.push(f.narrow(0, a - start, b - a)?);
            }
        }
        let rows = if rows.is_empty() { None } else { Some(Tensor::cat(&rows, 0)?) };
        // Only the prompt has image slots; generated tokens (recomputed after a preemption, or
        // fed back one by one) are text even when the model sampled the image token's id.
        let split = to.min(req.prompt.len()).max(from);
        let mut parts = Vec::with_capacity(2);
        if from < split {
            parts.push(self.model.embed(&seq.tokens[from..split], rows.as_ref())?);
        }
        if split < to {
            parts.push(self.model.embed_generated(&seq.tokens[split..to])?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    pub(crate) fn run_chunks(&mut self, chunks: &[(u64, usize)]) -> weft_model::Result<()> {
        for &(id, n) in chunks {
            let s = &self.seqs[&id];
            // The plan is computed from the same state; a chunk past the sequence's tokens
            // would be an engine bug, refused here before it can index out of range.
            assert!(
                n >= 1 && s.computed() + n <= s.tokens.len(),
                "chunk of {n} after {} of {}",
                s.computed(),
                s.tokens.len()
            );
            #[cfg(feature = "fault-injection")]
            self.inject_fault(s.req_id, id);
        }
        let wanted: Vec<(u64, usize, usize)> = chunks
            .iter()
            .map(|&(id, n)| {
                let s = &self.seqs[&id];
                (s.req_id, s.computed(), s.computed() + n)
            })
            .filter(|&(req, from, _)| from < self.requests[&req].prompt.len())
            .collect();
        self.gather_features(&wanted)?;
        let mut embeds = Vec::with_capacity(chunks.len());
        for &(id, n) in chunks {
            let from = self.seqs[&id].computed();
            embeds.push(self.chunk_embeddings(id, from, from + n)?);
        }
        for &(id, n) in chunks {
            self.make_room(id, n)?;
        }
        let wants: Vec<bool> =
            chunks.iter().map(|&(id, n)| self.seqs[&id].computed() + n == self.seqs[&id].tokens.len()).collect();
        let started = Instant::now();
        let inputs: Vec<SeqInput> = chunks
            .iter()
            .zip(embeds)
            .zip(&wants)
            .map(|((&(id, _), embeds), &want_logits)| {
                let seq = &self.seqs[&id];
                SeqInput { embeds, past: seq.computed(), blocks: &seq.blocks, want_logits }
            })
            .collect();
        let logits = self.model.forward(&mut self.pool, &inputs)?;
        drop(inputs);
        for &(id, n) in chunks {
            self.advance(id, n);
        }
        let forward = started.elapsed();
        let Some(logits) = logits else { return Ok(()) };
        let finishing: Vec<u64> = chunks.iter().zip(&wants).filter(|(_, &w)| w).map(|(c, _)| c.0).collect();
        let (storage, layout) = logits.storage_and_layout();
        let in_host = match &*storage {
            Storage::Cpu(CpuStorage::F32(values)) if layout.is_contiguous() => Some(&values[layout.start_offset()..]),
            _ => None,
        };
        for (id, scores) in finishing.iter().zip(self.host_scores(&finishing, &logits, in_host)?) {
            self.after_logits(*id, &scores)?;
        }
        tracing::debug!(
            seqs = chunks.len(),
            tokens = chunks.iter().map(|c| c.1).sum::<usize>(),
            forward_ms = forward.as_secs_f64() * 1e3,
            sample_ms = (started.elapsed() - forward).as_secs_f64() * 1e3,
            "step"
        );
        Ok(())
    }

    /// What each sequence of `finishing` samples from, given their logits (`[rows, vocab]`, their
    /// values `in_host` where they are host memory): on the CPU every row is read in place; on a
    /// GPU plain greedy rows are decided there and only their ids come back, and every other row
    /// (penalties, bias, logprobs, temperature, a grammar) is copied whole.
    fn host_scores<'a>(
        &self,
        finishing: &[u64],
        logits: &Tensor,
        in_host: Option<&'a [f32]>,
    ) -> weft_model::Result<Vec<Scores<'a>>> {
        let on_device: Vec<bool> = finishing
            .iter()
            .map(|id| {
                let spec = &self.requests[&self.seqs[id].req_id].spec;
                self.sample_on_device && spec.sampling.is_plain_greedy() && spec.constraint.is_none()
            })
            .collect();
        let chosen = if on_device.contains(&true) { first_argmax_rows(logits)? } else { vec![None; finishing.len()] };
        let copied: Vec<u32> =
            (0..finishing.len()).filter(|&i| !(on_device[i] && chosen[i].is_some())).map(|i| i as u32).collect();
        let vocab = logits.dim(1)?;
        let rows: Vec<Cow<'a, [f32]>> = match in_host {
            Some(values) => copied.iter().map(|&i| Cow::Borrowed(&values[i as usize * vocab..][..vocab])).collect(),
            None if copied.is_empty() => Vec::new(),
            None if copied.len() == finishing.len() => logits.to_vec2::<f32>()?.into_iter().map(Cow::Owned).collect(),
            None => {
                let picked = logits.index_select(&Tensor::new(copied.as_slice(), logits.device())?, 0)?;
                picked.to_vec2::<f32>()?.into_iter().map(Cow::Owned).collect()
            }
        };
        let mut rows = rows.into_iter();
        Ok((0..finishing.len())
            .map(|i| match chosen[i] {
                Some(token) if on_device[i] => Scores::Greedy(token),
                _ => Scores::Row(rows.next().expect("one copied row per sequence not chosen on the device")),
            })
            .collect())
    }

    /// Samples the next token of `id` (and, on a request's first logits, of its other choices).
    fn after_logits(&mut self, id: u64, row: &Scores<'_>) -> weft_model::Result<()> {
        let req_id = self.seqs[&id].req_id;
        let req = self.requests.get_mut(&req_id).expect("live");
        let mut siblings = Vec::new();
        if !req.choices_spawned {
            req.choices_spawned = true;
            req.features.iter_mut().for_each(|f| *f = None); // the prompt is in the KV now
            req.live_choices = req.spec.n.get();
            let spec = req.spec.clone();
            for choice in 1..spec.n.get() {
                // The prompt's blocks are shared, each held once more; the one its next token
                // goes into is copied when it is written (`make_room`).
                let sibling_id = self.new_id();
                let sibling = self.seqs[&id].sibling(sibling_id, choice, &spec);
                sibling.blocks.iter().for_each(|&b| self.blocks.retain(b));
                siblings.push(sibling_id);
                self.seqs.insert(sibling_id, sibling);
                self.running.push(sibling_id);
                self.in_step.push(sibling_id);
            }
        }
        for sid in siblings {
            self.emit(sid, row);
        }
        self.emit(id, row);
        Ok(())
    }

    fn emit(&mut self, id: u64, row: &Scores<'_>) {
        let pool_tokens = self.blocks.num_blocks() * self.pool.block_size();
        let context = self.model.config().text.max_position_embeddings.min(pool_tokens);
        let seq = self.seqs.get_mut(&id).expect("running");
        let req = self.requests.get(&seq.req_id).expect("live");
        let out = seq.sample(row, &req.prompt, &req.spec, &self.config.eos_token_ids, context, &*self.tokenizer);
        if seq.mask_us > 0 || req.spec.constraint.is_some() {
            self.stats.grammar_mask_us.fetch_add(std::mem::take(&mut seq.mask_us), Relaxed);
            self.stats.grammar_masks_total.fetch_add(1, Relaxed);
        }
        self.stats.generation_tokens_total.fetch_add(1, Relaxed);
        match out {
            Emitted::Token(event) => {
                let _ = req.events.send(event);
                self.extend_hashes(id);
            }
            Emitted::Finished(token_event, reason, text) => {
                if let Some(event) = token_event {
                    let _ = req.events.send(event);
                }
                self.finish(id, reason, text);
            }
            Emitted::Failed(message) => {
                tracing::warn!(%message, "a constrained sequence failed");
                let _ = req.events.send(Event::Error(crate::request::EngineError::Internal(message)));
                self.remove_seq(id);
            }
        }
    }

    fn finish(&mut self, id: u64, reason: FinishReason, text: String) {
        let seq = &self.seqs[&id];
        let req = &self.requests[&seq.req_id];
        let image_tokens = req.images.len() * self.model.config().tokens_per_image();
        let usage = Usage {
            prompt_tokens: req.prompt.len(),
            completion_tokens: seq.generated(req.prompt.len()),
            cached_tokens: seq.reused,
            image_tokens,
        };
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map_or(0.0, |t| (t - req.submitted).as_secs_f64());
        let timing = Timing {
            queue_s: since(seq.admitted_at),
            first_token_s: since(seq.first_token_at),
            total_s: (now - req.submitted).as_secs_f64(),
            vision_s: req.vision_s,
            inter_token_s: seq.inter_token.clone(),
        };
        let _ = req.events.send(Event::Finished { index: seq.choice, reason, text, usage, timing });
        self.remove_seq(id);
    }
}
