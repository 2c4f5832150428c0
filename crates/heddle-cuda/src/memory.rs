//! Sizing the KV cache from the GPU memory left after the weights and activations.

use heddle_model::ModelConfig;

/// Kept free beyond the fraction's budget for cuBLAS workspaces and the driver.
pub const RESERVE_BYTES: usize = 512 << 20;

/// Bytes of K and V one block of `block_size` positions holds over all layers, at
/// `element_bytes` an element.
pub fn kv_bytes_per_block(config: &ModelConfig, block_size: usize, element_bytes: usize) -> usize {
    2 * config.num_layers * config.num_kv_heads * config.head_dim * block_size * element_bytes
}

/// How many KV blocks fit when the process may use `fraction` of the device's `total`
/// memory and `total - free` is already in use (weights, activations, other processes).
pub fn blocks_for_fraction(free: usize, total: usize, fraction: f64, per_block: usize) -> usize {
    let budget = (total as f64 * fraction.clamp(0.0, 1.0)) as usize;
    let used = total.saturating_sub(free);
    budget.saturating_sub(used).saturating_sub(RESERVE_BYTES) / per_block.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_on_an_h100_gets_tens_of_gigabytes_of_cache() {
        let config =
            ModelConfig::from_hf_json(include_str!("../../../configs/llama-3.1-8b.json")).unwrap();
        // 32 layers × 8 KV heads × 128 dims × 2 (K and V) × 2 bytes = 128 KiB per position.
        let per_block = kv_bytes_per_block(&config, 16, 2);
        assert_eq!(per_block, 16 * 128 * 1024);
        // FP8 codes: half of it.
        assert_eq!(kv_bytes_per_block(&config, 16, 1), 16 * 64 * 1024);
        let gib = 1usize << 30;
        // 80 GiB card, 17 GiB in use (weights + activations): 0.9 × 80 − 17 − 0.5 = 54.5 GiB.
        let blocks = blocks_for_fraction(63 * gib, 80 * gib, 0.9, per_block);
        assert_eq!(blocks, (54 * gib + gib / 2) / per_block);
        // Nothing left: no blocks, not an underflow.
        assert_eq!(blocks_for_fraction(gib, 80 * gib, 0.5, per_block), 0);
    }
}
