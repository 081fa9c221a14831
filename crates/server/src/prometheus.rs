//! Prometheus metrics (names follow vLLM's): the recorder, the per-request histograms recorded
//! as each answer finishes, and the engine's counters and gauges, read at scrape time.

use weft_engine::{StatsSnapshot, Timing};

/// Installs the recorder (buckets from 1 ms to 5 minutes) and returns the handle `/metrics`
/// renders.
pub fn recorder() -> metrics_exporter_prometheus::PrometheusHandle {
    let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&buckets)
        .expect("non-empty buckets")
        .build_recorder();
    let handle = recorder.handle();
    // A second install (tests starting several servers) keeps the first recorder.
    let _ = metrics::set_global_recorder(recorder);
    handle
}

/// One finished answer's latencies.
pub fn record_finished(timing: &Timing) {
    metrics::histogram!("weft:time_to_first_token_seconds").record(timing.first_token_s);
    metrics::histogram!("weft:e2e_request_latency_seconds").record(timing.total_s);
    metrics::histogram!("weft:request_queue_time_seconds").record(timing.queue_s);
    for gap in &timing.inter_token_s {
        metrics::histogram!("weft:inter_token_latency_seconds").record(*gap);
    }
    metrics::counter!("weft:request_success_total").increment(1);
}

/// The engine's counters and gauges as they are now, and the requests in progress.
pub fn publish_engine(s: &StatsSnapshot, in_progress: usize) {
    metrics::gauge!("weft:num_requests_running").set(s.running as f64);
    metrics::gauge!("weft:num_requests_waiting").set(s.waiting as f64);
    metrics::gauge!("weft:kv_cache_usage_perc").set(s.kv_usage());
    metrics::counter!("weft:prompt_tokens_total").absolute(s.prompt_tokens_total);
    metrics::counter!("weft:generation_tokens_total").absolute(s.generation_tokens_total);
    metrics::counter!("weft:cached_prompt_tokens_total").absolute(s.cached_tokens_total);
    // vLLM's prefix-cache counters: prompt tokens looked up, and those found cached.
    metrics::counter!("weft:prefix_cache_queries_total").absolute(s.prefix_queries_total);
    metrics::counter!("weft:prefix_cache_hits_total").absolute(s.cached_tokens_total);
    metrics::counter!("weft:vision_cache_hits_total").absolute(s.vision_cache_hits);
    metrics::counter!("weft:vision_cache_misses_total").absolute(s.vision_cache_misses);
    metrics::counter!("weft:vision_encode_seconds_total").absolute(s.vision_encode_seconds as u64);
    metrics::counter!("weft:preemptions_total").absolute(s.preemptions_total);
    metrics::counter!("weft:engine_faults_total").absolute(s.faults_total);
    metrics::counter!("weft:grammar_masks_total").absolute(s.grammar_masks_total);
    // Cumulative, in seconds (a counter would round it to whole seconds).
    metrics::gauge!("weft:grammar_mask_seconds").set(s.grammar_mask_seconds);
    metrics::gauge!("weft:kv_cache_budget_bytes").set(s.kv_budget_bytes as f64);
    metrics::gauge!("weft:kv_cache_used_bytes").set(s.kv_used_bytes as f64);
    metrics::gauge!("weft:kv_cache_reserved_bytes").set(s.kv_reserved_bytes as f64);
    metrics::gauge!("weft:kv_cache_running_reserved_bytes").set(s.kv_running_reserved_bytes as f64);
    metrics::gauge!("weft:prefix_cache_bytes").set(s.prefix_cache_bytes as f64);
    metrics::gauge!("weft:vision_cache_bytes").set(s.vision_cache_bytes as f64);
    metrics::gauge!("weft:num_requests_in_progress").set(in_progress as f64);
    // The pool's shape as vLLM's `vllm:cache_config_info` gives it (what the Gateway API
    // Inference Extension's prefix-cache scorer reads); `num_gpu_blocks` counts the pool's
    // blocks on whatever device holds it.
    let (block_size, blocks) = (s.kv_block_size.to_string(), s.kv_num_blocks.to_string());
    metrics::gauge!("weft:cache_config_info", "block_size" => block_size, "num_gpu_blocks" => blocks).set(1.0);
}
