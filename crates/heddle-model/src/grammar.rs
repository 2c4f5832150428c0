//! Grammars that constrain what a sequence may generate (JSON schemas, regular
//! expressions, lists of choices, Lark grammars), compiled with llguidance over the
//! model's own vocabulary.
//!
//! A [`GrammarCompiler`] is built once per model: it turns every token id into the bytes
//! the token stands for (special tokens marked so that no grammar literal can match them)
//! and indexes them in a token trie. Compiling one request's grammar then gives a
//! [`TokenConstraint`]: the per-sequence state that says which tokens may come next and
//! advances with each accepted token.
//!
//! Work per request is bounded: the grammar's size, the lexer's states and the fuel spent
//! building the lexer at compile time and each mask afterwards are capped (llguidance's
//! limits), so a hostile schema is refused or runs out of fuel; it never stalls the engine.

use std::fmt;
use std::sync::Arc;

use heddle_core::TokenId;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's JSON mode).
    JsonObject,
    /// A JSON document valid under this JSON schema.
    JsonSchema(Value),
    /// A match of this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// Why a grammar was not compiled: the message names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// The size of the largest grammar source accepted (a schema's JSON, a regex, a Lark
/// text, all the choices together): 256 KiB.
pub const MAX_GRAMMAR_SOURCE_BYTES: usize = 256 * 1024;

/// Compiles grammars against one model's vocabulary; shared by all its requests.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish()
    }
}

impl GrammarCompiler {
    /// Indexes `tokenizer`'s vocabulary, padded to the model's `vocab_size` logits (ids
    /// past the tokenizer's are never allowed). The tokenizer's stop tokens are the ones
    /// a grammar allows once it is complete.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, GrammarError> {
        let stop_ids: Vec<TokenId> = tokenizer
            .stop_token_ids()
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab_size)
            .collect();
        let Some(&eos) = stop_ids.first() else {
            return Err(GrammarError(
                "the model's tokenizer names no end-of-sequence token".into(),
            ));
        };
        let words: Vec<Vec<u8>> = (0..vocab_size as TokenId)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                if tokenizer.is_special_token(id) {
                    // llguidance's convention: special tokens start with 0xFF, a byte no
                    // UTF-8 text contains, so only a grammar naming them can emit them.
                    [&[TokTrie::SPECIAL_TOKEN_MARKER], bytes.as_slice()].concat()
                } else {
                    bytes
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stop_ids);
        let env: TokEnv = Arc::new(VocabularyEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| GrammarError(format!("indexing the vocabulary failed: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Tighter than llguidance's defaults: one request's grammar must not occupy
            // the engine thread for long. About 10 ms of lexer work at compile time and
            // 5 ms per mask at the crate's measured speeds.
            initial_lexer_fuel: 500_000,
            step_lexer_fuel: 70_000,
            step_max_items: 50_000,
            max_lexer_states: 50_000,
            max_grammar_size: 200_000,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(GrammarCompiler { factory })
    }

    /// The number of token ids a mask covers.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// Compiles `spec` into a fresh constraint, or says what is wrong with it.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<TokenConstraint, GrammarError> {
        let grammar = top_level_grammar(spec)?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError(error));
        }
        Ok(TokenConstraint { matcher })
    }
}

fn top_level_grammar(spec: &GrammarSpec) -> Result<TopLevelGrammar, GrammarError> {
    let too_large = |what: &str, bytes: usize| {
        GrammarError(format!(
            "the {what} is {bytes} bytes; at most {MAX_GRAMMAR_SOURCE_BYTES} are accepted"
        ))
    };
    Ok(match spec {
        GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({
            "type": "object"
        }))),
        GrammarSpec::JsonSchema(schema) => {
            let bytes = serde_json::to_string(schema).map_or(0, |s| s.len());
            if bytes > MAX_GRAMMAR_SOURCE_BYTES {
                return Err(too_large("schema", bytes));
            }
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(GrammarError(
                    "a JSON schema must be an object or a boolean".into(),
                ));
            }
            TopLevelGrammar::from_json_schema(compact(schema.clone()))
        }
        GrammarSpec::Regex(regex) => {
            if regex.len() > MAX_GRAMMAR_SOURCE_BYTES {
                return Err(too_large("regular expression", regex.len()));
            }
            TopLevelGrammar::from_regex(regex)
        }
        GrammarSpec::Choice(choices) => {
            if choices.is_empty() {
                return Err(GrammarError("the list of choices is empty".into()));
            }
            let bytes: usize = choices.iter().map(String::len).sum();
            if bytes > MAX_GRAMMAR_SOURCE_BYTES {
                return Err(too_large("list of choices", bytes));
            }
            let alternatives: Vec<String> =
                choices.iter().map(|c| regex_syntax::escape(c)).collect();
            TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
        }
        GrammarSpec::Lark(lark) => {
            if lark.len() > MAX_GRAMMAR_SOURCE_BYTES {
                return Err(too_large("grammar", lark.len()));
            }
            TopLevelGrammar::from_lark(lark.clone())
        }
    })
}

/// Asks for JSON without optional whitespace, unless the schema sets its own layout
/// (`x-guidance`): a small model let loose on whitespace may emit newlines until its
/// token limit.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// One sequence's grammar state: which tokens may come next, advanced with each token the
/// sequence accepts. It never rolls back: preemption by recompute keeps the generated
/// tokens, so the state after them stays valid.
pub struct TokenConstraint {
    matcher: Matcher,
}

impl fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Clone for TokenConstraint {
    /// A copy at the same point of the grammar (the compiled grammar is shared).
    fn clone(&self) -> Self {
        TokenConstraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl TokenConstraint {
    /// The tokens allowed next. Once the grammar is complete, only the stop tokens.
    pub fn next_mask(&mut self) -> Result<TokenMask, GrammarError> {
        self.matcher
            .compute_mask_or_eos()
            .map(TokenMask)
            .map_err(|e| GrammarError(e.to_string()))
    }

    /// Advances past `token`; an error if the grammar does not allow it.
    pub fn accept(&mut self, token: TokenId) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError(e.to_string()))
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

/// The set of tokens a constraint allows next: one bit per token id.
#[derive(Clone, PartialEq)]
pub struct TokenMask(SimpleVob);

impl fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenMask({} allowed)", self.0.num_set())
    }
}

impl TokenMask {
    /// A mask over `size` token ids that allows exactly `tokens` (those below `size`).
    pub fn allowing(size: usize, tokens: &[TokenId]) -> TokenMask {
        let mut bits = SimpleVob::alloc(size);
        for &token in tokens.iter().filter(|&&t| (t as usize) < size) {
            bits.allow_token(token);
        }
        TokenMask(bits)
    }

    pub fn allows(&self, token: TokenId) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    pub fn num_allowed(&self) -> usize {
        self.0.num_set()
    }

    /// The mask as bits: token t is allowed when bit t % 32 of word t / 32 is set; tokens
    /// past the last word are not.
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }

    /// Sets every disallowed token's logit to -inf (tokens past the mask too).
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (chunk, &word) in logits.chunks_mut(32).zip(words) {
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        let covered = (words.len() * 32).min(logits.len());
        logits[covered..].fill(f32::NEG_INFINITY);
    }
}

/// The vocabulary as llguidance sees it: the trie of every token's bytes, and the
/// model's own tokenizer for the text a grammar forces.
struct VocabularyEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabularyEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(bytes, |text| {
            self.tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}
