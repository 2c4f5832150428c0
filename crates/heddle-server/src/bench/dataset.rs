//! The prompts a benchmark sends.
//!
//! Synthetic prompts are made of real tokens of the target model's tokenizer: random ids
//! drawn from its ordinary vocabulary are decoded to text, and the text is re-encoded and
//! adjusted until it encodes to exactly the requested number of tokens. Sending text (not
//! token ids) keeps every server and both endpoints usable, and the length check makes
//! the length claims true for any server that tokenizes like the model (heddle and
//! llama.cpp both do).

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use heddle_core::{Priority, TokenId};
use heddle_model::tokenizer::Tokenizer;
use rand::Rng;
use serde::Deserialize;

/// One request's worth of workload.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchPrompt {
    pub text: String,
    /// Tokens of `text` by the benchmark's tokenizer (special tokens parsed, no BOS).
    pub prompt_tokens: usize,
    /// `max_tokens` of the request.
    pub output_len: usize,
    /// The `priority` field to send, when a priority mix is configured.
    pub priority: Option<Priority>,
}

/// The smallest length a `--range-ratio` draw may give.
const MIN_LEN: usize = 1;
/// Re-encode rounds before giving up on an exact length; a handful is the norm.
const MAX_ADJUSTMENTS: usize = 64;

/// Makes prompt text of exact token lengths for one tokenizer.
pub struct PromptSynthesizer<'a> {
    tokenizer: &'a Tokenizer,
    /// Ids that decode to whole, non-empty text on their own: no control tokens (a
    /// server would treat them specially) and no byte fragments of a multi-byte
    /// character (their text only exists next to their neighbours).
    ordinary_ids: Vec<TokenId>,
}

impl<'a> PromptSynthesizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> anyhow::Result<Self> {
        let mut ordinary_ids = Vec::new();
        for id in 0..tokenizer.vocab_size() as TokenId {
            let text = tokenizer.decode(&[id], true)?;
            if !text.is_empty() && !text.contains(char::REPLACEMENT_CHARACTER) {
                ordinary_ids.push(id);
            }
        }
        ensure!(
            !ordinary_ids.is_empty(),
            "the tokenizer has no ordinary tokens to make prompts from"
        );
        Ok(Self {
            tokenizer,
            ordinary_ids,
        })
    }

    /// How many tokens `text` is, as a server tokenizes a prompt (special tokens parsed).
    pub fn count_tokens(&self, text: &str) -> anyhow::Result<usize> {
        Ok(self.tokenizer.encode(text, true)?.len())
    }

    /// Random text that encodes to exactly `total` tokens, the first of which are
    /// `head` (which must itself be the encoding of its decoded text, e.g. an earlier
    /// result of this function). Returns the text and its token ids.
    pub fn text_of_len(
        &self,
        rng: &mut impl Rng,
        head: &[TokenId],
        total: usize,
    ) -> anyhow::Result<(String, Vec<TokenId>)> {
        ensure!(
            total > 0 && total >= head.len(),
            "a prompt of {total} tokens cannot extend a head of {} tokens",
            head.len()
        );
        let tail_len = total - head.len();
        let mut tail: Vec<TokenId> = (0..tail_len).map(|_| self.random_id(rng)).collect();
        let mut ids = Vec::with_capacity(total + 8);
        for _ in 0..MAX_ADJUSTMENTS {
            ids.clear();
            ids.extend_from_slice(head);
            ids.extend_from_slice(&tail);
            let text = self.tokenizer.decode(&ids, false)?;
            let encoded = self.tokenizer.encode(&text, true)?;
            if !encoded.starts_with(head) {
                // The tail's first token merged with the end of the head: try another.
                if let Some(first) = tail.first_mut() {
                    *first = self.random_id(rng);
                }
                continue;
            }
            if encoded.len() == total {
                return Ok((text, encoded));
            }
            // Continue from what the text really encodes to, cut or topped up: decoding
            // a valid encoding and encoding it again is nearly always stable, so this
            // converges in a few rounds.
            tail.clear();
            tail.extend_from_slice(&encoded[head.len()..]);
            tail.truncate(tail_len);
            while tail.len() < tail_len {
                tail.push(self.random_id(rng));
            }
        }
        bail!("no text of exactly {total} tokens after {MAX_ADJUSTMENTS} adjustments")
    }

    fn random_id(&self, rng: &mut impl Rng) -> TokenId {
        self.ordinary_ids[rng.random_range(0..self.ordinary_ids.len())]
    }
}

/// A length drawn uniformly from `center × [1 − ratio, 1 + ratio]` (at least 1), as
/// `vllm bench serve`'s `--random-range-ratio`.
pub fn draw_len(rng: &mut impl Rng, center: usize, range_ratio: f64) -> usize {
    let low = ((center as f64) * (1.0 - range_ratio)).floor() as usize;
    let high = ((center as f64) * (1.0 + range_ratio)).ceil() as usize;
    rng.random_range(low.max(MIN_LEN)..=high.max(MIN_LEN))
}

/// `--dataset random`: independent random prompts of `input_len` tokens (± range ratio):
/// the prefix dataset with an empty prefix.
pub fn random_prompts(
    synth: &PromptSynthesizer<'_>,
    rng: &mut impl Rng,
    count: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
) -> anyhow::Result<Vec<BenchPrompt>> {
    prefix_prompts(synth, rng, count, &[], input_len, output_len, range_ratio)
}

/// `--dataset prefix`: every prompt starts with the tokens `prefix` (an earlier result of
/// [`PromptSynthesizer::text_of_len`]) and goes on with a random suffix of `input_len`
/// tokens (± range ratio). The prefix's tokens are the first tokens of every prompt's
/// encoding, so a prefix cache can reuse them.
pub fn prefix_prompts(
    synth: &PromptSynthesizer<'_>,
    rng: &mut impl Rng,
    count: usize,
    prefix: &[TokenId],
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
) -> anyhow::Result<Vec<BenchPrompt>> {
    (0..count)
        .map(|_| {
            let len = prefix.len() + draw_len(rng, input_len, range_ratio);
            let (text, ids) = synth.text_of_len(rng, prefix, len)?;
            Ok(BenchPrompt {
                text,
                prompt_tokens: ids.len(),
                output_len: draw_len(rng, output_len, range_ratio),
                priority: None,
            })
        })
        .collect()
}

/// Prompts of the same lengths, output lengths and priorities as `prompts`, with fresh
/// random tokens after the shared `prefix` (empty for none).
pub fn same_shape_prompts(
    synth: &PromptSynthesizer<'_>,
    rng: &mut impl Rng,
    prompts: &[BenchPrompt],
    prefix: &[TokenId],
) -> anyhow::Result<Vec<BenchPrompt>> {
    prompts
        .iter()
        .map(|prompt| {
            let (text, ids) = synth.text_of_len(rng, prefix, prompt.prompt_tokens)?;
            Ok(BenchPrompt {
                text,
                prompt_tokens: ids.len(),
                ..prompt.clone()
            })
        })
        .collect()
}

/// One line of a `--dataset file` JSONL file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecord {
    prompt: String,
    /// This prompt's `max_tokens`; `--output-len` when absent.
    output_len: Option<usize>,
}

/// `--dataset file`: the first `count` prompts of a JSONL file, one JSON object per
/// line: `{"prompt": "...", "output_len": 64}` (`output_len` optional). Blank lines are
/// skipped. A file with fewer prompts gives them all.
pub fn file_prompts(
    synth: &PromptSynthesizer<'_>,
    path: &Path,
    count: usize,
    output_len: usize,
) -> anyhow::Result<Vec<BenchPrompt>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut prompts = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        if prompts.len() == count {
            break;
        }
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: FileRecord = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: expected {{\"prompt\": \"...\"}}",
                path.display(),
                index + 1
            )
        })?;
        let output_len = record.output_len.unwrap_or(output_len);
        ensure!(
            output_len >= 1,
            "{}:{}: output_len must be at least 1",
            path.display(),
            index + 1
        );
        prompts.push(BenchPrompt {
            prompt_tokens: synth.count_tokens(&record.prompt)?,
            text: record.prompt,
            output_len,
            priority: None,
        });
    }
    ensure!(!prompts.is_empty(), "{} holds no prompts", path.display());
    if prompts.len() < count {
        tracing::warn!(
            "{} holds {} prompts, fewer than --num-prompts {count}: using them all",
            path.display(),
            prompts.len()
        );
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::sync::OnceLock;

    /// The embedded model's tokenizer (scripts/fetch-model.sh puts the model in place).
    fn tokenizer() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            let path = heddle_model::embedded_model_path()
                .expect("the embedded model; run scripts/fetch-model.sh");
            heddle_model::tokenizer::TokenizerBundle::from_gguf_file(path)
                .expect("its tokenizer")
                .tokenizer
        })
    }

    #[test]
    fn random_prompts_encode_to_exactly_the_requested_length() {
        let tokenizer = tokenizer();
        let synth = PromptSynthesizer::new(tokenizer).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        for len in [1, 2, 17, 128, 333] {
            let prompts = random_prompts(&synth, &mut rng, 4, len, 16, 0.0).unwrap();
            for prompt in prompts {
                assert_eq!(prompt.prompt_tokens, len);
                assert_eq!(tokenizer.encode(&prompt.text, true).unwrap().len(), len);
                assert_eq!(prompt.output_len, 16);
            }
        }
    }

    #[test]
    fn range_ratio_spreads_lengths_within_bounds() {
        let synth = PromptSynthesizer::new(tokenizer()).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let prompts = random_prompts(&synth, &mut rng, 40, 100, 50, 0.5).unwrap();
        for prompt in &prompts {
            assert!(
                (50..=150).contains(&prompt.prompt_tokens),
                "{}",
                prompt.prompt_tokens
            );
            assert_eq!(
                tokenizer().encode(&prompt.text, true).unwrap().len(),
                prompt.prompt_tokens
            );
            assert!((25..=75).contains(&prompt.output_len));
        }
        let distinct: std::collections::HashSet<_> =
            prompts.iter().map(|p| p.prompt_tokens).collect();
        assert!(distinct.len() > 10, "lengths barely vary: {distinct:?}");
        let mut rng = StdRng::seed_from_u64(0);
        assert!((0..1000).all(|_| draw_len(&mut rng, 1, 0.9) >= MIN_LEN));
    }

    #[test]
    fn prefix_prompts_share_the_prefix_tokens() {
        let tokenizer = tokenizer();
        let synth = PromptSynthesizer::new(tokenizer).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        let (_, prefix_ids) = synth.text_of_len(&mut rng, &[], 64).unwrap();
        let prompts = prefix_prompts(&synth, &mut rng, 6, &prefix_ids, 32, 8, 0.0).unwrap();
        let encoded: Vec<Vec<TokenId>> = prompts
            .iter()
            .map(|p| tokenizer.encode(&p.text, true).unwrap())
            .collect();
        let prefix = &encoded[0][..64];
        for (prompt, ids) in prompts.iter().zip(&encoded) {
            assert_eq!(ids.len(), 96);
            assert_eq!(prompt.prompt_tokens, 96);
            assert_eq!(&ids[..64], prefix, "the prefix tokens differ");
        }
        // The shared part is the prefix only: the suffixes differ.
        assert!(encoded
            .windows(2)
            .all(|pair| pair[0][64..] != pair[1][64..]));
        // And the text itself starts with the prefix's text.
        let prefix_text = tokenizer.decode(prefix, false).unwrap();
        assert!(prompts.iter().all(|p| p.text.starts_with(&prefix_text)));
    }

    #[test]
    fn same_shape_prompts_keep_lengths_and_priorities_with_new_tokens() {
        let tokenizer = tokenizer();
        let synth = PromptSynthesizer::new(tokenizer).unwrap();
        let mut rng = StdRng::seed_from_u64(13);
        let (_, prefix) = synth.text_of_len(&mut rng, &[], 20).unwrap();
        let mut prompts = prefix_prompts(&synth, &mut rng, 4, &prefix, 30, 12, 0.5).unwrap();
        prompts[1].priority = Some(Priority::High);
        let copies = same_shape_prompts(&synth, &mut rng, &prompts, &prefix).unwrap();
        for (prompt, copy) in prompts.iter().zip(&copies) {
            assert_ne!(prompt.text, copy.text);
            assert_eq!(prompt.prompt_tokens, copy.prompt_tokens);
            assert_eq!(prompt.output_len, copy.output_len);
            assert_eq!(prompt.priority, copy.priority);
            let ids = tokenizer.encode(&copy.text, true).unwrap();
            assert_eq!(ids.len(), copy.prompt_tokens);
            assert_eq!(&ids[..20], &prefix[..]);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_prompts() {
        let synth = PromptSynthesizer::new(tokenizer()).unwrap();
        let make =
            |seed| random_prompts(&synth, &mut StdRng::seed_from_u64(seed), 3, 20, 5, 0.2).unwrap();
        assert_eq!(make(5), make(5));
        assert_ne!(make(5), make(6));
    }

    #[test]
    fn ordinary_ids_exclude_control_tokens() {
        let tokenizer = tokenizer();
        let synth = PromptSynthesizer::new(tokenizer).unwrap();
        let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
        assert!(!synth.ordinary_ids.contains(&im_start));
        assert!(synth.ordinary_ids.len() > tokenizer.vocab_size() / 2);
    }

    #[test]
    fn file_prompts_read_jsonl_with_optional_output_len() {
        let synth = PromptSynthesizer::new(tokenizer()).unwrap();
        let good = TempFile::with_lines(&[
            r#"{"prompt": "Hello there"}"#,
            "",
            r#"{"prompt": "Name three colours.", "output_len": 7}"#,
            r#"{"prompt": "unused"}"#,
        ]);
        let prompts = file_prompts(&synth, &good.0, 2, 32).unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[0].text, "Hello there");
        assert_eq!(prompts[0].output_len, 32);
        assert_eq!(
            prompts[0].prompt_tokens,
            synth.count_tokens("Hello there").unwrap()
        );
        assert_eq!(prompts[1].output_len, 7);

        let bad = TempFile::with_lines(&[r#"{"text": "wrong key"}"#]);
        let error = file_prompts(&synth, &bad.0, 2, 32).unwrap_err();
        assert!(format!("{error:#}").contains(":1:"), "{error:#}");
    }

    /// A file in the temp directory, unique to this process and call, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn with_lines(lines: &[&str]) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "heddle-bench-dataset-{}-{}.jsonl",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
