//! The device sampler (greedy, seeded draws, penalties, logit biases and masks) and the
//! prompt-scoring kernel against the CPU's.

use super::*;

/// The device sampler against the CPU sampler: greedy with log-probabilities and with
/// penalties must match exactly; seeded draws must repeat and follow the distribution.
pub(super) fn sampler_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let vocab = 1000usize;
    let mut history = History(HashMap::new());
    history.0.insert(1, (vec![3, 5, 3, 7, 7], 2));
    let rows_params = [
        SamplingParams {
            logprobs: true,
            top_logprobs: 5,
            ..greedy()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            frequency_penalty: 0.2,
            presence_penalty: 0.1,
            logprobs: true,
            ..greedy()
        },
    ];
    let mut logits = random_values(rows_params.len() * vocab, 11, 5.0);
    // Make the penalised tokens the leaders, so that the penalties decide.
    for (t, v) in [(3usize, 9.0f32), (7, 9.1), (5, -9.0)] {
        logits[vocab + t] = v;
    }
    let seqs = rows_params
        .iter()
        .enumerate()
        .map(|(i, p)| ScheduledSeq {
            sampling: *p,
            prompt_logprobs: None,
            ..seq(i as RequestId, vec![0], 0, &[0])
        })
        .collect();
    let (tokens, logprobs, tops) = run_sampler(
        gpu,
        &logits,
        vocab,
        ScheduledBatch {
            seqs,
            preempted: vec![],
        },
        &history,
    )?;
    let mut mismatch = 0usize;
    let mut lp_err = 0f64;
    for (i, p) in rows_params.iter().enumerate() {
        let hist = history.sequence_tokens(i as RequestId).to_vec();
        let prompt = history.prompt_len(i as RequestId);
        let mut row = logits[i * vocab..][..vocab].to_vec();
        let cpu = heddle_model::sampling::sample(&mut row, p, &hist, prompt, 0);
        mismatch += (cpu.token != tokens[i]) as usize;
        lp_err = lp_err.max((cpu.logprob.unwrap_or(0.0) - logprobs[i]).abs() as f64);
        for (a, b) in cpu.top_logprobs.iter().zip(&tops[i]) {
            mismatch += (a.0 != b.0) as usize;
            lp_err = lp_err.max((a.1 - b.1).abs() as f64);
        }
    }
    checks.push(Check {
        name: format!("kernel sample greedy/penalties/top-logprobs vs CPU, mismatches ({tag})"),
        error: mismatch as f64,
        limit: Some(0.0),
    });
    checks.push(Check {
        name: format!("kernel sample log-probabilities, abs error ({tag})"),
        error: lp_err,
        limit: Some(1e-4),
    });

    checks.extend(adjusted_sampler_checks(gpu, tag)?);
    checks.extend(score_kernel_checks(gpu, tag)?);

    // Probabilities 0.1 .. 0.4 over four tokens; 4000 seeded draws, then again.
    let vocab = 4usize;
    let draws = 4000usize;
    let row: Vec<f32> = (1..=4).map(|i| (i as f32).ln()).collect();
    let logits: Vec<f32> = (0..draws).flat_map(|_| row.clone()).collect();
    let batch = |p: SamplingParams| ScheduledBatch {
        seqs: (0..draws)
            .map(|i| ScheduledSeq {
                sampling: p,
                prompt_logprobs: None,
                num_generated: i,
                last_token_pending: false,
                ..seq(i as RequestId, vec![0], 0, &[0])
            })
            .collect(),
        preempted: vec![],
    };
    let seeded = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..Default::default()
    };
    let (first, _, _) = run_sampler(gpu, &logits, vocab, batch(seeded), &history)?;
    let (second, _, _) = run_sampler(gpu, &logits, vocab, batch(seeded), &history)?;
    checks.push(Check {
        name: format!("kernel sample seeded draws repeat, mismatches ({tag})"),
        error: first.iter().zip(&second).filter(|(a, b)| a != b).count() as f64,
        limit: Some(0.0),
    });
    let mut counts = [0usize; 4];
    for &t in &first {
        counts[t as usize] += 1;
    }
    let worst = (0..4)
        .map(|i| (counts[i] as f64 / draws as f64 - (i + 1) as f64 / 10.0).abs())
        .fold(0.0, f64::max);
    checks.push(Check {
        name: format!("kernel sample distribution, max abs error ({tag})"),
        error: worst,
        limit: Some(0.03),
    });
    // top_k 2: only tokens 2 and 3; top_p 0.5: the same; min_p 0.6: the same.
    let mut outside = 0usize;
    for p in [
        SamplingParams { top_k: 2, ..seeded },
        SamplingParams {
            top_p: 0.5,
            ..seeded
        },
        SamplingParams {
            min_p: 0.6,
            ..seeded
        },
    ] {
        let (tokens, _, _) = run_sampler(gpu, &logits, vocab, batch(p), &history)?;
        outside += tokens.iter().filter(|&&t| t < 2).count();
    }
    checks.push(Check {
        name: format!("kernel sample top-k/top-p/min-p filters, tokens outside ({tag})"),
        error: outside as f64,
        limit: Some(0.0),
    });
    Ok(checks)
}

/// Logit biases and grammar masks applied by the device sampler against the CPU
/// sampler's `sample_adjusted`: greedy rows with a mask that excludes the leader, with a
/// ban of the leader and a boost, with both and penalties; log-probabilities stay the raw
/// ones; seeded draws under a mask never leave it.
fn adjusted_sampler_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let vocab = 1000usize;
    let mut history = History(HashMap::new());
    history.0.insert(2, (vec![3, 5, 3, 7, 7], 2));
    let logits = random_values(4 * vocab, 12, 5.0);
    let leader = |row: usize| {
        let r = &logits[row * vocab..][..vocab];
        (0..vocab).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as TokenId
    };
    // Allowed: every third token and the last few (past-the-mask tokens are banned).
    let allowed: Vec<TokenId> = (0..vocab as TokenId - 40)
        .filter(|t| t % 3 == 1 && *t != leader(0) && *t != leader(2))
        .collect();
    let mask = TokenMask::allowing(vocab - 40, &allowed);
    let with_logprobs = SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        ..greedy()
    };
    let rows: Vec<(SamplingParams, LogitsAdjustment)> = vec![
        (
            with_logprobs,
            LogitsAdjustment {
                bias: Vec::new().into(),
                mask: Some(mask.clone()),
            },
        ),
        (
            with_logprobs,
            LogitsAdjustment {
                bias: vec![(leader(1), -100.0), (17, 30.0)].into(),
                mask: None,
            },
        ),
        (
            SamplingParams {
                repetition_penalty: 1.3,
                presence_penalty: 0.5,
                ..with_logprobs
            },
            LogitsAdjustment {
                bias: vec![(3, 40.0), (7, 39.5), (allowed[5], 1.0)].into(),
                mask: Some(mask.clone()),
            },
        ),
        (with_logprobs, LogitsAdjustment::default()),
    ];
    let mut adjustments = StepAdjustments::new();
    for (i, (_, a)) in rows.iter().enumerate() {
        adjustments.insert(i as RequestId, a.clone());
    }
    let batch = ScheduledBatch {
        seqs: rows
            .iter()
            .enumerate()
            .map(|(i, (p, _))| ScheduledSeq {
                sampling: *p,
                prompt_logprobs: None,
                ..seq(i as RequestId, vec![0], 0, &[0])
            })
            .collect(),
        preempted: vec![],
    };
    let (tokens, logprobs, tops) =
        run_adjusted_sampler(gpu, &logits, vocab, batch, &history, Some(&adjustments))?;
    let mut sampler = heddle_model::sampling::Sampler::default();
    let (mut mismatch, mut lp_err) = (0usize, 0f64);
    for (i, (p, a)) in rows.iter().enumerate() {
        let hist = history.sequence_tokens(i as RequestId).to_vec();
        let prompt = history.prompt_len(i as RequestId);
        let mut row = logits[i * vocab..][..vocab].to_vec();
        let cpu = sampler.sample_adjusted(&mut row, p, Some(a), &hist, prompt, 0);
        mismatch += (cpu.token != tokens[i]) as usize;
        lp_err = lp_err.max((cpu.logprob.unwrap_or(0.0) - logprobs[i]).abs() as f64);
        for (a, b) in cpu.top_logprobs.iter().zip(&tops[i]) {
            mismatch += (a.0 != b.0) as usize;
            lp_err = lp_err.max((a.1 - b.1).abs() as f64);
        }
    }
    // The rows must have changed the choice, or the check proves nothing.
    let changed = (0..3).filter(|&i| tokens[i] != leader(i)).count();
    let mut checks = vec![
        Check {
            name: format!(
                "kernel sample with logit biases and grammar masks vs CPU, mismatches ({tag})"
            ),
            error: (mismatch + (3 - changed)) as f64,
            limit: Some(0.0),
        },
        Check {
            name: format!("kernel sample adjusted log-probabilities stay raw, abs error ({tag})"),
            error: lp_err,
            limit: Some(1e-4),
        },
    ];

    // 2000 seeded draws under the mask at temperature 1: none outside it.
    let draws = 2000usize;
    let drawn = SamplingParams {
        temperature: 1.0,
        seed: Some(9),
        ..Default::default()
    };
    let mut adjustments = StepAdjustments::new();
    let row_logits: Vec<f32> = (0..draws)
        .flat_map(|_| logits[..vocab].iter().copied())
        .collect();
    let seqs = (0..draws)
        .map(|i| {
            adjustments.insert(
                i as RequestId,
                LogitsAdjustment {
                    bias: Vec::new().into(),
                    mask: Some(mask.clone()),
                },
            );
            ScheduledSeq {
                sampling: drawn,
                prompt_logprobs: None,
                num_generated: i,
                last_token_pending: false,
                ..seq(i as RequestId, vec![0], 0, &[0])
            }
        })
        .collect();
    let batch = ScheduledBatch {
        seqs,
        preempted: vec![],
    };
    let (tokens, _, _) =
        run_adjusted_sampler(gpu, &row_logits, vocab, batch, &history, Some(&adjustments))?;
    checks.push(Check {
        name: format!("kernel sample seeded draws under a grammar mask, tokens outside ({tag})"),
        error: tokens.iter().filter(|&&t| !mask.allows(t)).count() as f64,
        limit: Some(0.0),
    });
    Ok(checks)
}

/// `score_tokens` against the CPU's `token_logprobs` on random rows: the target's
/// log-probability and the top alternatives (none, a few, the most).
fn score_kernel_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let vocab = 1000usize;
    let tops = [0i32, 3, MAX_TOP_LOGPROBS as i32, 1];
    let targets = [7i32, 999, 0, 512];
    let mut logits = random_values(tops.len() * vocab, 23, 6.0);
    // A tie among the leaders: the lower id comes first, as on the CPU.
    logits[vocab + 10] = 8.0;
    logits[vocab + 20] = 8.0;
    let rows = tops.len();
    let logits_buf = gpu.upload(&logits)?;
    let (targets_buf, tops_buf) = (gpu.upload(&targets)?, gpu.upload(&tops)?);
    let out = gpu.alloc(rows * SCORE_WORDS * 4)?;
    gpu.launch(
        "score_tokens",
        grid(rows, SAMPLE_THREADS),
        &[
            &logits_buf.ptr,
            &(vocab as i32),
            &targets_buf.ptr,
            &tops_buf.ptr,
            &out.ptr,
        ],
    )?;
    let mut words = vec![0i32; rows * SCORE_WORDS];
    gpu.read(&out, &mut words)?;
    let (mut mismatch, mut lp_err) = (0usize, 0f64);
    let mut ids = Vec::new();
    for (i, row_words) in words.chunks_exact(SCORE_WORDS).enumerate() {
        let row = &logits[i * vocab..][..vocab];
        let (logprob, top) = heddle_model::sampling::token_logprobs(
            row,
            targets[i] as TokenId,
            tops[i] as usize,
            &mut ids,
        );
        lp_err = lp_err.max((logprob - f32::from_bits(row_words[0] as u32)).abs() as f64);
        for (k, &(id, lp)) in top.iter().enumerate() {
            mismatch += (row_words[1 + 2 * k] as TokenId != id) as usize;
            lp_err = lp_err.max((lp - f32::from_bits(row_words[2 + 2 * k] as u32)).abs() as f64);
        }
    }
    Ok(vec![
        Check {
            name: format!("kernel score_tokens top ids vs CPU, mismatches ({tag})"),
            error: mismatch as f64,
            limit: Some(0.0),
        },
        Check {
            name: format!("kernel score_tokens log-probabilities, abs error ({tag})"),
            error: lp_err,
            limit: Some(1e-4),
        },
    ])
}

type SamplerOutput = (Vec<TokenId>, Vec<f32>, Vec<Vec<(TokenId, f32)>>);

fn run_sampler(
    gpu: &Gpu,
    logits: &[f32],
    vocab: usize,
    batch: ScheduledBatch,
    history: &History,
) -> anyhow::Result<SamplerOutput> {
    run_adjusted_sampler(gpu, logits, vocab, batch, history, None)
}

/// [`run_sampler`], with `adjustments` applied before the draw when given.
fn run_adjusted_sampler(
    gpu: &Gpu,
    logits: &[f32],
    vocab: usize,
    batch: ScheduledBatch,
    history: &History,
    adjustments: Option<&StepAdjustments>,
) -> anyhow::Result<SamplerOutput> {
    let mut plan = StepPlan::default();
    plan.build(&batch, history, 16, 1, false, vocab, None);
    let mut adjustment_words = vec![0];
    if let Some(adjustments) = adjustments {
        plan.mark_adjusted();
        adjustment_words = vec![0; crate::adjustments::packed_len(&plan.rows, adjustments)];
        crate::adjustments::pack(&plan.rows, adjustments, &mut adjustment_words);
    }
    let adjustment_buf = gpu.upload(&adjustment_words)?;
    let rows = plan.rows.len();
    let meta = gpu.upload(&plan.words)?;
    let logits_buf = gpu.upload(logits)?;
    let originals = gpu.alloc(plan.num_penalties.max(1) * 4)?;
    let out = gpu.alloc(rows * (2 + 2 * MAX_TOP_LOGPROBS) * 4)?;
    let o = plan.offsets;
    gpu.launch(
        "sample",
        grid(rows, SAMPLE_THREADS),
        &[
            &logits_buf.ptr,
            &(vocab as i32),
            &(meta.ptr + 4 * o.sample_params as u64),
            &(meta.ptr + 4 * o.penalties as u64),
            &originals.ptr,
            &adjustment_buf.ptr,
            &out.ptr,
            &(rows as i32),
        ],
    )?;
    let mut words = vec![0i32; rows * (2 + 2 * MAX_TOP_LOGPROBS)];
    gpu.read(&out, &mut words)?;
    let tokens = words[..rows].iter().map(|&t| t as TokenId).collect();
    let logprobs = words[rows..2 * rows]
        .iter()
        .map(|&b| f32::from_bits(b as u32))
        .collect();
    let tops = (0..rows)
        .map(|i| {
            words[2 * rows + i * 2 * MAX_TOP_LOGPROBS..][..2 * MAX_TOP_LOGPROBS]
                .chunks_exact(2)
                .take(plan.rows[i].top_logprobs)
                .map(|p| (p[0] as TokenId, f32::from_bits(p[1] as u32)))
                .collect()
        })
        .collect();
    Ok((tokens, logprobs, tops))
}
