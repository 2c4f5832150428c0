//! The scheduler gauges under vLLM's names, beside heddle's own: what the Gateway API
//! Inference Extension's model-server protocol (llm-d's endpoint picker) and other
//! routers written for vLLM scrape to choose a replica. Same values as heddle's
//! families, labelled `model_name` as vLLM labels them:
//!
//! - `vllm:num_requests_waiting`: requests queued, of every priority
//!   (the sum of `heddle_queue_depth`);
//! - `vllm:num_requests_running`: sequences in the batch (`heddle_running_sequences`);
//! - `vllm:kv_cache_usage_perc`: the share of KV blocks that cannot be handed out now,
//!   0 to 1 as in vLLM despite the name (`heddle_kv_blocks_used / heddle_kv_blocks_total`);
//! - `vllm:cache_config_info`: 1, labelled with the cache's `block_size` and
//!   `num_gpu_blocks` (vLLM's name, whatever the device), which prefix-aware scorers read
//!   to cut prompts into blocks as the replica does.

use heddle_core::SchedulerStats;

use crate::metrics::{EngineReport, Family};

/// Reads one gauge's value from a scheduler's counters.
type GaugeOf = fn(&SchedulerStats) -> f64;

/// Appends the families, one sample per loaded model.
pub fn write(out: &mut String, engines: &[EngineReport]) {
    let families: [(&str, &str, GaugeOf); 3] = [
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            |s| s.waiting.iter().sum::<usize>() as f64,
        ),
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            |s| s.running as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_cache_usage,
        ),
    ];
    for (name, help, value) in families {
        let mut family = Family::new(out, name, "gauge", help);
        for engine in engines {
            family.sample("", &[("model_name", &engine.model)], value(&engine.stats));
        }
    }
    let mut family = Family::new(
        out,
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    for engine in engines {
        let kv = &engine.stats.kv;
        let (block_size, blocks) = (kv.block_size.to_string(), kv.total_blocks.to_string());
        let labels = [
            ("model_name", engine.model.as_str()),
            ("block_size", &block_size),
            ("num_gpu_blocks", &blocks),
        ];
        family.sample("", &labels, 1.0);
    }
}

fn kv_cache_usage(stats: &SchedulerStats) -> f64 {
    if stats.kv.total_blocks == 0 {
        0.0
    } else {
        stats.kv.used_blocks as f64 / stats.kv.total_blocks as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineHealth;

    #[test]
    fn gauges_carry_the_schedulers_values_under_vllm_names() {
        let mut stats = SchedulerStats {
            waiting: [1, 2, 4],
            running: 3,
            ..SchedulerStats::default()
        };
        stats.kv.total_blocks = 200;
        stats.kv.used_blocks = 50;
        stats.kv.block_size = 16;
        let engines = [EngineReport {
            model: "m".into(),
            stats,
            health: EngineHealth::Running,
        }];
        let mut text = String::new();
        write(&mut text, &engines);
        assert!(text.contains("# TYPE vllm:num_requests_waiting gauge\n"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"m\"} 7\n"));
        assert!(text.contains("vllm:num_requests_running{model_name=\"m\"} 3\n"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n"));
        assert!(text.contains(
            "vllm:cache_config_info{model_name=\"m\",block_size=\"16\",num_gpu_blocks=\"200\"} 1\n"
        ));
    }

    #[test]
    fn an_empty_pool_is_unused() {
        assert_eq!(kv_cache_usage(&SchedulerStats::default()), 0.0);
    }
}
