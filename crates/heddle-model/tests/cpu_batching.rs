//! The CPU runner's batching contract on the embedded model: a sequence's outputs do not
//! depend on what shares its steps, how its prompt is chunked, which blocks hold its
//! K/V, or whether its prefix was computed by another sequence.

mod cpu_support;

use cpu_support::{embedded_runner, embedded_runner_with, Driver, Seq, BLOCK_SIZE};
use heddle_core::{SamplingParams, ScheduledBatch, ScheduledSeq, SequenceTokens, TokenId};
use heddle_model::{ModelError, ModelRunner};

/// Eight prompts of different lengths (ChatML-looking token soup from the vocabulary).
fn prompts() -> Vec<Vec<TokenId>> {
    (0..8u32)
        .map(|i| {
            let len = 5 + 9 * i as usize;
            let mut p = vec![1, 9690, 198];
            p.extend((0..len as u32).map(|j| 300 + (j * 7919 + i * 104_729) % 20_000));
            p.extend([2, 198, 1, 520, 9531, 198]);
            p
        })
        .collect()
}

fn with_logprobs(params: SamplingParams) -> SamplingParams {
    SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        ..params
    }
}

/// Each prompt alone: whole-prompt prefill, then decoding, `n` tokens.
fn alone(driver: &mut Driver, params: &[SamplingParams], n: usize) -> Vec<Seq> {
    prompts()
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (p, &params))| {
            let mut seq = [Seq::new(i as u64, p, params)];
            driver.generate(&mut seq, usize::MAX, n);
            let [seq] = seq;
            seq
        })
        .collect()
}

/// All prompts in shared steps: sequence i joins at step 2i, prompts prefill in chunks of
/// 5 tokens beside other sequences' prefills and decodes.
fn together(driver: &mut Driver, params: &[SamplingParams], n: usize) -> Vec<Seq> {
    let mut seqs: Vec<Seq> = prompts()
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (p, &params))| Seq::new(i as u64, p, params))
        .collect();
    let mut step = 0;
    loop {
        let mut active: Vec<&mut Seq> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, s)| *i <= step / 2 && s.generated().len() < n)
            .map(|(_, s)| s)
            .collect();
        if active.is_empty() && step / 2 >= 8 {
            return seqs;
        }
        if !active.is_empty() {
            driver.step(&mut active, 5);
        }
        step += 1;
    }
}

fn assert_same_outputs(a: &[Seq], b: &[Seq]) {
    for (a, b) in a.iter().zip(b) {
        assert_eq!(
            a.generated(),
            b.generated(),
            "sequence {}: tokens differ",
            a.id
        );
        // Log-probabilities too, bit for bit: no row's arithmetic saw the rest of the batch.
        assert_eq!(a.outputs, b.outputs, "sequence {}: outputs differ", a.id);
    }
}

#[test]
fn greedy_outputs_do_not_depend_on_the_batch() {
    let mut driver = Driver::new(embedded_runner(256));
    let params = vec![with_logprobs(SamplingParams::greedy()); 8];
    let solo = alone(&mut driver, &params, 12);
    let mixed = together(&mut driver, &params, 12);
    assert_same_outputs(&solo, &mixed);
    // The prompts are different enough that the outputs are too: the test compares
    // eight real continuations, not one repeated.
    let mut distinct: Vec<&[TokenId]> = solo.iter().map(Seq::generated).collect();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 6, "{distinct:?}");
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch_or_preemption() {
    let mut driver = Driver::new(embedded_runner(320));
    let params: Vec<SamplingParams> = (0..8)
        .map(|i| {
            with_logprobs(SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: 50,
                repetition_penalty: 1.1,
                frequency_penalty: 0.2,
                seed: Some(1000 + i),
                ..Default::default()
            })
        })
        .collect();
    let solo = alone(&mut driver, &params, 12);
    let mixed = together(&mut driver, &params, 12);
    assert_same_outputs(&solo, &mixed);

    // Preempted after 5 tokens and recomputed (prompt and output prefilled again into
    // other blocks), a sequence goes on exactly as if never interrupted.
    let mut seq = [Seq::new(3, &prompts()[3], params[3])];
    driver.generate(&mut seq, usize::MAX, 5);
    seq[0].blocks.clear();
    seq[0].computed = 0;
    driver.generate(&mut seq, 7, 12);
    assert_eq!(seq[0].generated(), solo[3].generated());
    assert_eq!(seq[0].outputs[5..], solo[3].outputs[5..]);
}

#[test]
fn blocks_computed_by_another_sequence_serve_a_shared_prefix() {
    let mut driver = Driver::new(embedded_runner(64));
    let shared = 2 * BLOCK_SIZE;
    let prompt_a: Vec<TokenId> = prompts()[4].iter().copied().take(shared + 7).collect();
    assert_eq!(prompt_a.len(), shared + 7);
    let mut prompt_b = prompt_a[..shared].to_vec();
    prompt_b.extend([504, 1390, 314, 260, 3725, 30, 2]);
    let params = with_logprobs(SamplingParams::greedy());

    let mut a = [Seq::new(1, &prompt_a, params)];
    driver.generate(&mut a, usize::MAX, 4);

    // B starts after the shared blocks, which A filled.
    let mut b = [Seq::new(2, &prompt_b, params)];
    b[0].blocks = a[0].blocks[..2].to_vec();
    b[0].computed = shared;
    driver.generate(&mut b, usize::MAX, 8);

    let mut c = [Seq::new(3, &prompt_b, params)];
    driver.generate(&mut c, usize::MAX, 8);
    assert_ne!(b[0].blocks[..2], c[0].blocks[..2]);
    assert_eq!(b[0].generated(), c[0].generated());
    for (b, c) in b[0].outputs.iter().zip(&c[0].outputs) {
        assert_eq!(
            (b.token, b.logprob, &b.top_logprobs),
            (c.token, c.logprob, &c.top_logprobs)
        );
    }
}

#[test]
fn the_block_size_does_not_change_the_results() {
    // 16 and 32 have register-resident score kernels, 24 takes the general path; all do
    // the same arithmetic, so even block sizes give identical results.
    let params = with_logprobs(SamplingParams::greedy());
    let run = |block_size: usize| {
        let mut driver = Driver::new(embedded_runner_with(1024 / block_size, block_size));
        let mut seqs: Vec<Seq> = prompts()[5..]
            .iter()
            .enumerate()
            .map(|(i, p)| Seq::new(i as u64, p, params))
            .collect();
        driver.generate(&mut seqs, 20, 10);
        seqs
    };
    let want = run(16);
    for block_size in [24, 32] {
        for (a, b) in run(block_size).iter().zip(&want) {
            assert_eq!(a.generated(), b.generated(), "block size {block_size}");
            assert_eq!(a.outputs, b.outputs, "block size {block_size}");
        }
    }
}

struct NoHistory;

impl SequenceTokens for NoHistory {
    fn sequence_tokens(&self, _: u64) -> &[TokenId] {
        &[]
    }

    fn prompt_len(&self, _: u64) -> usize {
        0
    }
}

#[test]
fn malformed_batches_are_refused() {
    let mut runner = embedded_runner(4);
    let seq = ScheduledSeq {
        id: 1,
        tokens: vec![1; 20],
        start_position: 0,
        block_table: vec![0],
        needs_logits: true,
        sampling: SamplingParams::greedy(),
        prompt_logprobs: None,
        num_generated: 0,
        last_token_pending: false,
    };
    let step = |runner: &mut heddle_model::CpuRunner, seq: ScheduledSeq| {
        let batch = ScheduledBatch {
            seqs: vec![seq],
            preempted: vec![],
        };
        runner.step(&batch, &NoHistory)
    };
    // 20 positions need two blocks of 16.
    let err = step(&mut runner, seq.clone()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidBatch(_)), "{err}");
    assert!(err.to_string().contains("block table"), "{err}");
    let err = step(
        &mut runner,
        ScheduledSeq {
            block_table: vec![0, 9],
            ..seq.clone()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("block 9"), "{err}");
    let err = step(
        &mut runner,
        ScheduledSeq {
            tokens: vec![49_152],
            block_table: vec![0],
            ..seq.clone()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let err = step(
        &mut runner,
        ScheduledSeq {
            start_position: 8191,
            tokens: vec![1, 1],
            ..seq
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
}
