//! Incremental detokenization: a request's generated tokens in, text deltas out.
//!
//! A token is not always a whole character (byte-level BPE splits emoji and CJK into
//! bytes), and some decoders change a token's text depending on its neighbours
//! (SentencePiece drops the space of the first word). So instead of decoding tokens one by
//! one, each step decodes a short window twice — the tokens already emitted since the
//! last boundary, and the same plus the new ones — and emits the difference, holding it
//! back while it ends in an incomplete character (U+FFFD). The window then moves on, so a
//! step costs O(window), not O(text).

use std::sync::Arc;

use heddle_core::TokenId;

use crate::tokenizer::{Tokenizer, TokenizerError};

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Per-request streaming decoder. Concatenating every [`IncrementalDetokenizer::push`] and the
/// final [`IncrementalDetokenizer::finish`] gives `tokenizer.decode(all, skip_special)`.
#[derive(Debug)]
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special: bool,
    /// The current window: `tokens[..read]` were emitted by the last step that produced
    /// text and stay as context for neighbour-dependent decoders; `tokens[read..]` are
    /// pending. Older tokens are dropped.
    tokens: Vec<TokenId>,
    read: usize,
}

impl IncrementalDetokenizer {
    /// `skip_special`: leave special tokens (`<|im_end|>`, ...) out of the text.
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            tokens: Vec::new(),
            read: 0,
        }
    }

    /// Adds one generated token and returns the text it completes: possibly empty (the
    /// token is part of a character still incomplete, or a skipped special token),
    /// possibly more than the token's own text (it completes a held character).
    pub fn push(&mut self, token: TokenId) -> Result<String, TokenizerError> {
        self.tokens.push(token);
        let (prefix_text, full_text) = self.decode_window()?;
        if full_text.len() <= prefix_text.len()
            || full_text.ends_with(REPLACEMENT)
            || !full_text.is_char_boundary(prefix_text.len())
        {
            return Ok(String::new());
        }
        let delta = full_text[prefix_text.len()..].to_owned();
        // Keep the just-emitted tokens as context for the next window.
        self.tokens.drain(..self.read);
        self.read = self.tokens.len();
        Ok(delta)
    }

    /// Text still held when generation ends: an incomplete character (as U+FFFD, since no
    /// more bytes will come). Empty in the normal case.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let (prefix_text, full_text) = self.decode_window()?;
        let delta = match full_text.get(prefix_text.len()..) {
            Some(rest) if full_text.starts_with(&prefix_text) => rest.to_owned(),
            // The tail rewrote the context's text; emit the tail decoded on its own.
            _ => self
                .tokenizer
                .decode(&self.tokens[self.read..], self.skip_special)?,
        };
        self.tokens.clear();
        self.read = 0;
        Ok(delta)
    }

    /// (text of the emitted context, text of context + pending tokens).
    fn decode_window(&self) -> Result<(String, String), TokenizerError> {
        let prefix_text = self
            .tokenizer
            .decode(&self.tokens[..self.read], self.skip_special)?;
        let full_text = self.tokenizer.decode(&self.tokens, self.skip_special)?;
        Ok((prefix_text, full_text))
    }
}
