//! The machine's streaming-read bandwidth: the floor under a decode step, which must read
//! every weight of the model once (for one sequence or many).

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second of summing a buffer of `bytes` with every rayon thread, the best of
/// `rounds` passes.
pub fn stream_read_bandwidth(bytes: usize, rounds: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buffer: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(rayon::current_num_threads() * 8);
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = buffer
                .par_chunks(chunk)
                .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            (words * 8) as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0f64, f64::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_is_a_positive_finite_rate() {
        let rate = super::stream_read_bandwidth(1 << 20, 2);
        assert!(rate.is_finite() && rate > 1e6, "{rate}");
    }
}
