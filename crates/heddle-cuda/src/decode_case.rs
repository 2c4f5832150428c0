//! A decode-attention problem on the GPU: per sequence one decode token whose keys and
//! values already sit in a random K/V cache behind a shuffled block table. The self-test
//! checks the decode kernel on it against an f64 CPU reference, and `heddle-cuda
//! attention` times it (with the device-to-device copy bandwidth as the yardstick).

use crate::fp8::{e4m3_from_f32, e4m3_to_f32};
use crate::gpu::{DeviceBuffer, Gpu};
use crate::kernels::{DType, KernelShape, KvCacheDtype};
use crate::runner::{launch_attention, AttentionArgs};
use crate::xorshift::xorshift64;

pub struct DecodeCase {
    pub contexts: Vec<usize>,
    pub block_tables: Vec<Vec<u32>>,
    pub qkv: DeviceBuffer,
    pub k_cache: DeviceBuffer,
    pub v_cache: DeviceBuffer,
    pub out: DeviceBuffer,
    /// tiles ([t, 1, seq, position] per sequence), then the block tables, then their offsets.
    meta: DeviceBuffer,
    tables_at: usize,
    offsets_at: usize,
    partials: DeviceBuffer,
}

impl DecodeCase {
    /// Sequence i has `contexts[i]` positions (its decode token is the last); the cache
    /// has exactly the blocks the tables need, handed out in a shuffled order. Values are
    /// the triangular random values of `init_random` (scale 1); an FP8 cache holds the
    /// E4M3 codes of uniform values in [-2, 2).
    pub fn new(
        gpu: &Gpu,
        shape: &KernelShape,
        contexts: &[usize],
        seed: u64,
    ) -> anyhow::Result<Self> {
        let bs = shape.block_size;
        let per_seq: Vec<usize> = contexts.iter().map(|c| c.div_ceil(bs)).collect();
        let num_blocks: usize = per_seq.iter().sum();
        // Fisher-Yates over the block ids, so neighbouring blocks of a sequence are apart.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        let mut rng = xorshift64(seed);
        for i in (1..ids.len()).rev() {
            let j = (rng.next().unwrap_or(0) % (i as u64 + 1)) as usize;
            ids.swap(i, j);
        }
        let mut block_tables = Vec::new();
        let mut taken = 0;
        for &n in &per_seq {
            block_tables.push(ids[taken..taken + n].to_vec());
            taken += n;
        }
        let mut words: Vec<i32> = Vec::new();
        for (i, &c) in contexts.iter().enumerate() {
            words.extend([i as i32, 1, i as i32, c as i32 - 1]);
        }
        let tables_at = words.len();
        let mut offsets = Vec::new();
        for table in &block_tables {
            offsets.push((words.len() - tables_at) as i32);
            words.extend(table.iter().map(|&b| b as i32));
        }
        let offsets_at = words.len();
        words.extend(offsets);

        let e = shape.dtype.size_in_bytes();
        let qkv_width = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim;
        let cache_elems = num_blocks * bs * shape.num_kv_heads * shape.head_dim;
        let random = |n: usize, seed: u64| -> anyhow::Result<DeviceBuffer> {
            let buffer = gpu.alloc(n * e)?;
            crate::weights::fill_random(gpu, buffer.ptr, n, seed, 0.0, 1.0)?;
            Ok(buffer)
        };
        let cache = |seed: u64| -> anyhow::Result<DeviceBuffer> {
            match shape.kv_cache {
                KvCacheDtype::Auto => random(cache_elems, seed),
                KvCacheDtype::Fp8 => {
                    let codes: Vec<u8> = xorshift64(seed)
                        .take(cache_elems)
                        .map(|r| {
                            e4m3_from_f32(((r >> 11) as f64 / (1u64 << 51) as f64 - 2.0) as f32)
                        })
                        .collect();
                    gpu.upload(&codes)
                }
            }
        };
        let blocks = contexts.len() * shape.attention_grid_y();
        Ok(DecodeCase {
            contexts: contexts.to_vec(),
            block_tables,
            qkv: random(contexts.len() * qkv_width, seed ^ 1)?,
            k_cache: cache(seed ^ 2)?,
            v_cache: cache(seed ^ 3)?,
            out: gpu.alloc(contexts.len() * shape.num_heads * shape.head_dim * e)?,
            meta: gpu.upload(&words)?,
            tables_at,
            offsets_at,
            partials: gpu
                .alloc(shape.decode_partial_words(blocks, crate::kernels::MAX_DECODE_SPLITS) * 4)?,
        })
    }

    /// Bytes of keys and values the decode tokens read.
    pub fn kv_bytes(&self, shape: &KernelShape) -> usize {
        let positions: usize = self.contexts.iter().sum();
        2 * positions * shape.num_kv_heads * shape.head_dim * shape.kv_element_bytes()
    }

    /// Queues attention for every sequence's decode token; `splits` as in [`AttentionArgs`].
    pub fn launch(
        &self,
        gpu: &Gpu,
        shape: &KernelShape,
        splits: Option<usize>,
    ) -> anyhow::Result<()> {
        self.launch_on(gpu, shape, splits, shape.has_decode_kernel())
    }

    /// As [`Self::launch`], through the general (prefill) kernel: its tiles may hold a
    /// single token too.
    pub fn launch_general(&self, gpu: &Gpu, shape: &KernelShape) -> anyhow::Result<()> {
        self.launch_on(gpu, shape, Some(1), false)
    }

    fn launch_on(
        &self,
        gpu: &Gpu,
        shape: &KernelShape,
        splits: Option<usize>,
        decode: bool,
    ) -> anyhow::Result<()> {
        let at = |words: usize| self.meta.ptr + 4 * words as u64;
        let n = self.contexts.len();
        launch_attention(
            gpu,
            shape,
            &AttentionArgs {
                qkv: self.qkv.ptr,
                k_cache: self.k_cache.ptr,
                v_cache: self.v_cache.ptr,
                out: self.out.ptr,
                tiles: at(0),
                num_tiles: if decode { 0 } else { n },
                num_decode_tiles: if decode { n } else { 0 },
                block_tables: at(self.tables_at),
                table_offsets: at(self.offsets_at),
                scale: 1.0 / (shape.head_dim as f32).sqrt(),
                partials: self.partials.ptr,
                splits,
            },
        )
    }

    /// The attention output in f64 from the device's own inputs (read back as f32 values).
    pub fn reference(&self, gpu: &Gpu, shape: &KernelShape) -> anyhow::Result<Vec<f32>> {
        let (hd, nh, nkv) = (shape.head_dim, shape.num_heads, shape.num_kv_heads);
        let qkv = read_values(gpu, &self.qkv, shape.dtype)?;
        let k = read_cache(gpu, &self.k_cache, shape)?;
        let v = read_cache(gpu, &self.v_cache, shape)?;
        let width = (nh + 2 * nkv) * hd;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f32; self.contexts.len() * nh * hd];
        for (s, &context) in self.contexts.iter().enumerate() {
            let row = |pos: usize, g: usize| {
                let slot = self.block_tables[s][pos / shape.block_size] as usize * shape.block_size
                    + pos % shape.block_size;
                (slot * nkv + g) * hd
            };
            for h in 0..nh {
                let g = h / (nh / nkv);
                let q = &qkv[s * width + h * hd..][..hd];
                let scores: Vec<f64> = (0..context)
                    .map(|p| {
                        let kr = &k[row(p, g)..][..hd];
                        q.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let sum: f64 = (0..context)
                        .map(|p| weights[p] * v[row(p, g) + d] as f64)
                        .sum();
                    out[(s * nh + h) * hd + d] = (sum / total) as f32;
                }
            }
        }
        Ok(out)
    }

    /// Fills the output with NaNs (all bits set), so that an element left unwritten fails.
    pub fn poison_output(&self, gpu: &Gpu) -> anyhow::Result<()> {
        // SAFETY: the buffer holds `bytes` bytes; the fill is ordered on the stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.out.ptr,
                0xff,
                self.out.bytes,
                gpu.stream.cu_stream(),
            )
        }?;
        Ok(())
    }

    pub fn output(&self, gpu: &Gpu, shape: &KernelShape) -> anyhow::Result<Vec<f32>> {
        read_values(gpu, &self.out, shape.dtype)
    }
}

/// A whole KV cache buffer as f32 values (FP8 codes decoded exactly).
fn read_cache(gpu: &Gpu, buffer: &DeviceBuffer, shape: &KernelShape) -> anyhow::Result<Vec<f32>> {
    match shape.kv_cache {
        KvCacheDtype::Auto => read_values(gpu, buffer, shape.dtype),
        KvCacheDtype::Fp8 => {
            let mut codes = vec![0u8; buffer.bytes];
            gpu.read(buffer, &mut codes)?;
            Ok(codes.into_iter().map(e4m3_to_f32).collect())
        }
    }
}

/// A whole buffer of the device dtype as f32 values.
fn read_values(gpu: &Gpu, buffer: &DeviceBuffer, dtype: DType) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => {
            let mut out = vec![0f32; buffer.bytes / 4];
            gpu.read(buffer, &mut out)?;
            out
        }
        DType::Bf16 => {
            let mut out = vec![0u16; buffer.bytes / 2];
            gpu.read(buffer, &mut out)?;
            out.into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect()
        }
    })
}

/// One timing of `heddle-cuda attention`.
pub struct Timing {
    pub sequences: usize,
    pub context: usize,
    pub splits: usize,
    pub micros: f64,
    pub kv_bytes: usize,
}

/// Mean microseconds per call of `f` over `reps` calls queued back to back (after two
/// untimed ones), timed by device events.
pub fn time_device(
    gpu: &Gpu,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    f()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.stream.record_event(flags)?;
    for _ in 0..reps {
        f()?;
    }
    let end = gpu.stream.record_event(flags)?;
    Ok(start.elapsed_ms(&end)? as f64 * 1000.0 / reps as f64)
}

/// Device-to-device copy bandwidth in bytes per second, counting bytes read plus written,
/// over a copy of `bytes`.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> anyhow::Result<f64> {
    let src = gpu.alloc(bytes)?;
    let dst = gpu.alloc(bytes)?;
    let micros = time_device(gpu, 10, || {
        // SAFETY: both buffers hold `bytes` bytes; the copy is ordered on the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                src.ptr,
                bytes,
                gpu.stream.cu_stream(),
            )
        }?;
        Ok(())
    })?;
    Ok(2.0 * bytes as f64 / (micros * 1e-6))
}

/// Decode attention alone at `shape` for each (sequences, context) in `cases`, with the
/// runner's own choice of context split.
pub fn time_cases(
    gpu: &Gpu,
    shape: &KernelShape,
    cases: &[(usize, usize)],
) -> anyhow::Result<Vec<Timing>> {
    let mut timings = Vec::new();
    for &(sequences, context) in cases {
        let case = DecodeCase::new(gpu, shape, &vec![context; sequences], 7)?;
        let splits = crate::kernels::decode_splits(
            sequences * shape.attention_grid_y(),
            gpu.multiprocessors,
        );
        let reps = (2_000_000_000 / case.kv_bytes(shape).max(1)).clamp(20, 2000);
        let micros = time_device(gpu, reps, || case.launch(gpu, shape, None))?;
        timings.push(Timing {
            sequences,
            context,
            splits: if shape.has_decode_kernel() { splits } else { 1 },
            micros,
            kv_bytes: case.kv_bytes(shape),
        });
    }
    Ok(timings)
}
