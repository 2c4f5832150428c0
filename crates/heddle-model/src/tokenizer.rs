//! Text ⇄ token ids: a wrapper around the `tokenizers` crate that loads either a Hugging
//! Face `tokenizer.json` or the tokenizer stored in a GGUF file's metadata.
//!
//! A GGUF file stores a GPT-2-style byte-level BPE as plain arrays (tokens, merges, token
//! types) plus the name of a pre-tokenizer family (`tokenizer.ggml.pre`). From those we
//! rebuild the equivalent `tokenizers` pipeline (the family's split regexes, the byte-level
//! alphabet, BPE, and control / user-defined tokens as added tokens), so prompts get the
//! same ids as under llama.cpp and the model's own Hugging Face tokenizer.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use heddle_core::TokenId;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::chat_template::{ChatTemplate, ChatTemplateError};

/// Why a tokenizer (or the rest of a model's text handling) could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read GGUF {}: {source}", path.display())]
    GgufFile {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A GGUF tokenizer key is missing or has the wrong type.
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    /// The tokenizer is valid but of a kind heddle cannot reproduce (yet).
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// An error from the `tokenizers` crate.
    #[error("tokenizer: {0}")]
    Backend(#[source] tokenizers::Error),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// Token texts that end a turn in common chat models. GGUF files and configs often record
/// a single EOS id while the chat template ends turns with another token (`<|im_end|>`,
/// `<|eot_id|>`); generation must stop on any of them, as llama.cpp does.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<|call|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
];

/// Fill-in-the-middle tokens that pad or open another file or repository: a code model
/// that emits one has finished the text it was asked for (llama.cpp stops on them too).
const FIM_BOUNDARY_TOKENS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`) that mark
/// tokens matched before pre-tokenization rather than produced by BPE merges.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// GPT-2's pre-tokenizer regex: contractions, letters, numbers, other symbols (each with
/// an optional leading space) and whitespace runs that leave the last space to the next word.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's regex: case-insensitive contractions (spelled out, as llama.cpp does, so no
/// Unicode case folding sneaks in), numbers in groups of up to three, newlines apart.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's regex: Llama 3's with every digit on its own.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE splits text into words before merging, named after the GGUF
/// `tokenizer.ggml.pre` values that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreTokenizer {
    /// GPT-2's regex alone.
    Gpt2,
    /// Every digit isolated first, then GPT-2's regex: SmolLM and StarCoder. Their
    /// `tokenizer.json` says `Digits(individual_digits) + ByteLevel(use_regex)`, which is
    /// exactly this.
    DigitsThenGpt2,
    Llama3,
    Qwen2,
}

impl PreTokenizer {
    const SUPPORTED: &'static str =
        "gpt2, gpt-2, smollm, starcoder, refact, llama3, llama-v3, llama-bpe, falcon3, qwen2, \
         deepseek-r1-qwen";

    fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gpt2" | "gpt-2" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" => Self::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            _ => return None,
        })
    }

    /// The regexes applied one after the other; matches and the text between them both
    /// become words (llama.cpp's `unicode_regex_split`, `Split` with `Isolated` here).
    fn regexes(self) -> &'static [&'static str] {
        match self {
            Self::Gpt2 => &[GPT2_REGEX],
            Self::DigitsThenGpt2 => &[r"\p{N}", GPT2_REGEX],
            Self::Llama3 => &[LLAMA3_REGEX],
            Self::Qwen2 => &[QWEN2_REGEX],
        }
    }

    /// Llama 3 takes a word that is itself in the vocabulary as one token without merging
    /// (`ignore_merges` in its `tokenizer.json`), which can differ from the merge result.
    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    /// What llama.cpp assumes when the GGUF has no `tokenizer.ggml.add_bos_token`.
    fn default_add_bos(self) -> bool {
        self == Self::Llama3
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for regex in self.regexes() {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::Backend)?;
            steps.push(split.into());
        }
        // The words are already split: only map bytes to the byte-level alphabet.
        steps.push(ByteLevel::new(false, false, false).into());
        Ok(Sequence::new(steps).into())
    }
}

/// A model's tokenizer, with the special ids the engine needs.
///
/// `Send + Sync`; share it behind an `Arc` between the HTTP side (prompts) and the
/// engine (detokenization).
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens treated as plain text, built on first use by
    /// `encode(.., parse_special: false)` (the setting is per tokenizer, not per call).
    literal: OnceLock<tokenizers::Tokenizer>,
    bos: Option<TokenId>,
    eos: Option<TokenId>,
    add_bos: bool,
    stop_ids: Vec<TokenId>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. The special tokens' roles come from the
    /// `tokenizer_config.json` and `generation_config.json` beside it, when present.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let configs = HfConfigs::read(path.parent().unwrap_or(Path::new(".")))?;
        Self::from_hf(path, &configs)
    }

    /// Builds the byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Only `tokenizer.ggml.model == "gpt2"` is supported; SentencePiece (`"llama"`) and
    /// other models, and pre-tokenizer families not listed in the error, fail clearly
    /// rather than tokenizing subtly wrong.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = Metadata(&content.metadata);
        let model = md.required_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!(
                "GGUF tokenizer model {model:?}: only byte-level BPE (\"gpt2\") is supported; \
                 SentencePiece (\"llama\") and others are not yet"
            )));
        }
        let pre_name = md.str("tokenizer.ggml.pre")?.ok_or_else(|| {
            TokenizerError::Metadata(
                "no tokenizer.ggml.pre: the file predates pre-tokenizer metadata, \
                 re-convert it with a recent llama.cpp"
                    .into(),
            )
        })?;
        let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| {
            TokenizerError::Unsupported(format!(
                "GGUF pre-tokenizer {pre_name:?}; supported: {}",
                PreTokenizer::SUPPORTED
            ))
        })?;

        let tokens = md.required_str_array("tokenizer.ggml.tokens")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.to_string(), id as TokenId))
            .collect();
        let merges = md
            .required_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        TokenizerError::Metadata(format!(
                            "merge {merge:?} is not two space-separated tokens"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre.ignore_merges())
            .build()
            .map_err(TokenizerError::Backend)?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(ByteLevel::default()));

        // Control tokens are special (parsed only on request, skippable when decoding);
        // user-defined ones are ordinary added tokens, always whole, as in llama.cpp.
        let types = md
            .int_array("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(TokenizerError::Metadata(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let added: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter_map(|(&ty, &text)| match ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => Some(AddedToken::from(text, true)),
                TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(text, false)),
                _ => None,
            })
            .map(|token| token.normalized(false))
            .collect();
        inner.add_tokens(added).map_err(TokenizerError::Backend)?;

        let bos = md.token_id("tokenizer.ggml.bos_token_id", tokens.len())?;
        let eos = md.token_id("tokenizer.ggml.eos_token_id", tokens.len())?;
        let add_bos = md
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(pre.default_add_bos());
        let mut stop_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            stop_ids.extend(md.token_id(key, tokens.len())?);
        }
        Ok(Self::assemble(inner, bos, eos, add_bos, stop_ids))
    }

    fn from_hf(path: &Path, configs: &HfConfigs) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(TokenizerError::Backend)?;
        let id_of = |key: &str| {
            configs
                .special_token(key)
                .and_then(|text| inner.token_to_id(text))
        };
        let bos = id_of("bos_token").or_else(|| configs.generation_id("bos_token_id"));
        let eos = id_of("eos_token");
        // Without an explicit flag, BOS is added when the tokenizer's own post-processor
        // would add it (Llama 3's TemplateProcessing does; Qwen's adds nothing).
        let add_bos = match configs.tokenizer_bool("add_bos_token") {
            Some(flag) => flag,
            None => match bos {
                Some(bos) => inner
                    .encode_fast("", true)
                    .map_err(TokenizerError::Backend)?
                    .get_ids()
                    .contains(&bos),
                None => false,
            },
        };
        let mut stop_ids: Vec<TokenId> = eos.into_iter().collect();
        stop_ids.extend(configs.generation_ids("eos_token_id"));
        Ok(Self::assemble(
            inner,
            bos,
            eos.or(stop_ids.first().copied()),
            add_bos,
            stop_ids,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<TokenId>,
        eos: Option<TokenId>,
        add_bos: bool,
        mut stop_ids: Vec<TokenId>,
    ) -> Self {
        // gpt-oss ("harmony") ends its turn with <|return|> or <|call|>; its <|end|> only
        // closes a channel, after which the final answer is still to come.
        let harmony = ["<|return|>", "<|call|>"]
            .iter()
            .all(|text| inner.token_to_id(text).is_some());
        stop_ids.extend(
            END_OF_TURN_TOKENS
                .iter()
                .chain(FIM_BOUNDARY_TOKENS)
                .filter(|text| !(harmony && **text == "<|end|>"))
                .filter_map(|text| inner.token_to_id(text)),
        );
        let mut seen = std::collections::HashSet::new();
        stop_ids.retain(|id| seen.insert(*id));
        Self {
            inner,
            literal: OnceLock::new(),
            bos,
            eos,
            add_bos,
            stop_ids,
        }
    }

    /// Token ids of `text`, without BOS. With `parse_special`, special-token texts such as
    /// `<|im_start|>` become their single ids (what a rendered chat prompt needs); without
    /// it they are tokenized as ordinary text (what untrusted user text needs).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            self.literal.get_or_init(|| {
                let mut literal = self.inner.clone();
                literal.set_encode_special_tokens(true);
                literal
            })
        };
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(TokenizerError::Backend)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a whole prompt: special tokens parsed, and BOS first when the model
    /// asks for it, unless the text already starts with it (chat templates often write
    /// `bos_token` themselves, and a doubled BOS degrades the output).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<TokenId>> {
        let mut ids = self.encode(text, true)?;
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// The text of `ids`. Invalid UTF-8 (a character cut between tokens) becomes U+FFFD;
    /// use [`crate::detokenizer::IncrementalDetokenizer`] for streaming.
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(TokenizerError::Backend)
    }

    /// The text of one token (special tokens included), or `None` for an unknown id.
    /// A token holding part of a multi-byte character shows it as U+FFFD.
    pub fn token_to_piece(&self, id: TokenId) -> Option<String> {
        self.inner.id_to_token(id)?;
        self.inner.decode(&[id], false).ok()
    }

    /// The raw bytes of one token, which may be part of a multi-byte character (what
    /// OpenAI's log-probability objects report as `bytes`); `None` for an unknown id.
    /// Added tokens are their text; byte-level BPE pieces map back through the GPT-2 byte
    /// alphabet; SentencePiece pieces turn `<0xHH>` into that byte and `▁` into a space.
    pub fn token_bytes(&self, id: TokenId) -> Option<Vec<u8>> {
        if let Some(text) = self.inner.get_added_vocabulary().simple_id_to_token(id) {
            return Some(text.into_bytes());
        }
        let piece = self.inner.id_to_token(id)?;
        if matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            return piece.chars().map(byte_level_byte).collect();
        }
        let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
        if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return Some(vec![byte]);
        }
        Some(piece.replace('\u{2581}', " ").into_bytes())
    }

    /// Whether `id` is a special token (`<|im_end|>`, ...): control, not text.
    pub fn is_special_token(&self, id: TokenId) -> bool {
        let added = self.inner.get_added_vocabulary();
        added
            .simple_id_to_token(id)
            .is_some_and(|text| added.is_special_token(&text))
    }

    /// The id of a token given its vocabulary text (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<TokenId> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<TokenId> {
        self.eos
    }

    /// The BOS token's text, for chat templates' `bos_token`.
    pub fn bos_token(&self) -> Option<String> {
        self.inner.id_to_token(self.bos?)
    }

    /// The EOS token's text, for chat templates' `eos_token`.
    pub fn eos_token(&self) -> Option<String> {
        self.inner.id_to_token(self.eos?)
    }

    /// Whether [`Tokenizer::encode_prompt`] puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Every id that ends generation (`StopCriteria::eos_token_ids`): EOS, the end-of-turn
    /// and end-of-message ids the metadata names, and the vocabulary's known end-of-turn
    /// and fill-in-the-middle boundary tokens; the same set as llama.cpp's EOG tokens.
    pub fn stop_token_ids(&self) -> &[TokenId] {
        &self.stop_ids
    }
}

/// Everything text-side a model needs: its tokenizer and its chat template.
#[derive(Debug)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

impl TokenizerBundle {
    /// From a GGUF file's metadata; the template is `tokenizer.chat_template`, or ChatML
    /// when the file has none.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let tokenizer = Tokenizer::from_gguf(content)?;
        let source = Metadata(&content.metadata).str("tokenizer.chat_template")?;
        let chat_template = ChatTemplate::for_tokenizer(source, &tokenizer)?;
        Ok(Self {
            tokenizer,
            chat_template,
        })
    }

    /// From a GGUF file on disk; reads its header and metadata, not its tensors.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut BufReader::new(file)).map_err(|source| {
            TokenizerError::GgufFile {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::from_gguf(&content)
    }

    /// From a Hugging Face model directory: `tokenizer.json`, plus `tokenizer_config.json`
    /// and `generation_config.json` when present. The template is `chat_template.jinja`
    /// when present (newer repositories), else `chat_template` in `tokenizer_config.json`
    /// (a string, or a list of named templates of which "default" is used), else ChatML.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let configs = HfConfigs::read(dir)?;
        let tokenizer = Tokenizer::from_hf(&dir.join("tokenizer.json"), &configs)?;
        let jinja_path = dir.join("chat_template.jinja");
        let jinja = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(TokenizerError::Io {
                    path: jinja_path,
                    source,
                })
            }
        };
        let source = match jinja {
            Some(text) => Some(text),
            None => configs.chat_template()?,
        };
        let chat_template = ChatTemplate::for_tokenizer(source.as_deref(), &tokenizer)?;
        Ok(Self {
            tokenizer,
            chat_template,
        })
    }
}

/// The JSON files of a Hugging Face model directory that describe special tokens.
struct HfConfigs {
    tokenizer: Option<serde_json::Value>,
    generation: Option<serde_json::Value>,
}

impl HfConfigs {
    fn read(dir: &Path) -> Result<Self> {
        Ok(Self {
            tokenizer: read_optional_json(&dir.join("tokenizer_config.json"))?,
            generation: read_optional_json(&dir.join("generation_config.json"))?,
        })
    }

    /// A special token's text: a string, or an object with `content` (an AddedToken).
    fn special_token(&self, key: &str) -> Option<&str> {
        let value = self.tokenizer.as_ref()?.get(key)?;
        value
            .as_str()
            .or_else(|| value.get("content").and_then(|c| c.as_str()))
    }

    fn tokenizer_bool(&self, key: &str) -> Option<bool> {
        self.tokenizer.as_ref()?.get(key)?.as_bool()
    }

    fn generation_ids(&self, key: &str) -> Vec<TokenId> {
        let Some(value) = self.generation.as_ref().and_then(|g| g.get(key)) else {
            return Vec::new();
        };
        let as_id = |v: &serde_json::Value| v.as_u64().and_then(|id| TokenId::try_from(id).ok());
        match value.as_array() {
            Some(ids) => ids.iter().filter_map(as_id).collect(),
            None => as_id(value).into_iter().collect(),
        }
    }

    fn generation_id(&self, key: &str) -> Option<TokenId> {
        self.generation_ids(key).first().copied()
    }

    fn chat_template(&self) -> Result<Option<String>> {
        let Some(value) = self.tokenizer.as_ref().and_then(|t| t.get("chat_template")) else {
            return Ok(None);
        };
        if let Some(text) = value.as_str() {
            return Ok(Some(text.to_owned()));
        }
        let named: Vec<(&str, &str)> = value
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|entry| {
                        Some((
                            entry.get("name")?.as_str()?,
                            entry.get("template")?.as_str()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let chosen = named
            .iter()
            .find(|(name, _)| *name == "default")
            .or(named.first());
        match chosen {
            Some((_, template)) => Ok(Some((*template).to_owned())),
            None => Err(TokenizerError::ChatTemplate(ChatTemplateError::Invalid(
                "tokenizer_config.json: chat_template is neither a string nor a list of \
                 {name, template}"
                    .into(),
            ))),
        }
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_owned(),
            source,
        })
}

/// Typed access to GGUF metadata with errors that name the key (candle's own accessors
/// would print whole 49k-entry arrays on a type mismatch).
struct Metadata<'a>(&'a HashMap<String, gguf_file::Value>);

impl<'a> Metadata<'a> {
    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn required_str(&self, key: &str) -> Result<&'a str> {
        self.str(key)?.ok_or_else(|| missing(key))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a bool", other)),
        }
    }

    /// A token id that must lie inside the vocabulary; llama.cpp writes them as u32.
    fn token_id(&self, key: &str, vocab_len: usize) -> Result<Option<TokenId>> {
        let Some(value) = self.0.get(key) else {
            return Ok(None);
        };
        let id = as_int(value).ok_or_else(|| wrong_type(key, "an integer", value))?;
        match TokenId::try_from(id) {
            Ok(id) if (id as usize) < vocab_len => Ok(Some(id)),
            _ => Err(TokenizerError::Metadata(format!(
                "{key} = {id} is outside the vocabulary of {vocab_len}"
            ))),
        }
    }

    fn required_str_array(&self, key: &str) -> Result<Vec<&'a str>> {
        let items = self.array(key)?.ok_or_else(|| missing(key))?;
        items
            .iter()
            .map(|item| match item {
                gguf_file::Value::String(s) => Ok(s.as_str()),
                other => Err(wrong_type(key, "an array of strings", other)),
            })
            .collect()
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|item| as_int(item).ok_or_else(|| wrong_type(key, "an array of integers", item)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn array(&self, key: &str) -> Result<Option<&'a Vec<gguf_file::Value>>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(key, "an array", other)),
        }
    }
}

fn as_int(value: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match *value {
        V::U8(v) => Some(v.into()),
        V::I8(v) => Some(v.into()),
        V::U16(v) => Some(v.into()),
        V::I16(v) => Some(v.into()),
        V::U32(v) => Some(v.into()),
        V::I32(v) => Some(v.into()),
        V::U64(v) => i64::try_from(v).ok(),
        V::I64(v) => Some(v),
        _ => None,
    }
}

fn missing(key: &str) -> TokenizerError {
    TokenizerError::Metadata(format!("missing {key}"))
}

fn wrong_type(key: &str, expected: &str, got: &gguf_file::Value) -> TokenizerError {
    TokenizerError::Metadata(format!(
        "{key} should be {expected}, found {:?}",
        got.value_type()
    ))
}

/// The byte a character of the GPT-2 byte-level alphabet stands for: printable Latin-1
/// bytes stand for themselves; the other 68 bytes, in order, were moved to U+0100 onwards.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let shifted = (code - 256) as usize;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(shifted)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_maps_back_to_every_byte() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('\u{120}'), Some(b' ')); // Ġ
        assert_eq!(byte_level_byte('\u{10A}'), Some(b'\n')); // Ċ
        assert_eq!(byte_level_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_byte(' '), None);
        assert_eq!(byte_level_byte('\u{200}'), None);
        let mut seen: Vec<u8> = ('\0'..='\u{143}').filter_map(byte_level_byte).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..=255).collect::<Vec<u8>>());
    }
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString};

    /// The words a family splits `text` into, in the byte-level alphabet (Ġ = space,
    /// Ċ = newline).
    fn words(family: PreTokenizer, text: &str) -> String {
        use tokenizers::PreTokenizer as _;
        let mut split = PreTokenizedString::from(text);
        family.build().unwrap().pre_tokenize(&mut split).unwrap();
        split
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(word, _, _)| word)
            .collect::<Vec<_>>()
            .join("|")
    }

    #[test]
    fn families_split_like_their_reference_regexes() {
        let text = "I'm 2024 f(x)  \nDON'T";
        assert_eq!(
            words(PreTokenizer::Gpt2, text),
            "I|'m|Ġ2024|Ġf|(|x|)|ĠĠ|Ċ|DON|'|T"
        );
        assert_eq!(
            words(PreTokenizer::DigitsThenGpt2, text),
            "I|'m|Ġ|2|0|2|4|Ġf|(|x|)|ĠĠ|Ċ|DON|'|T"
        );
        assert_eq!(
            words(PreTokenizer::Llama3, text),
            "I|'m|Ġ|202|4|Ġf|(x|)|ĠĠĊ|DON|'T"
        );
        assert_eq!(
            words(PreTokenizer::Qwen2, text),
            "I|'m|Ġ|2|0|2|4|Ġf|(x|)|ĠĠĊ|DON|'T"
        );
    }

    #[test]
    fn gguf_pre_names_map_to_families() {
        assert_eq!(
            PreTokenizer::from_gguf_name("smollm"),
            Some(PreTokenizer::DigitsThenGpt2)
        );
        assert_eq!(
            PreTokenizer::from_gguf_name("llama-bpe"),
            Some(PreTokenizer::Llama3)
        );
        assert_eq!(
            PreTokenizer::from_gguf_name("qwen2"),
            Some(PreTokenizer::Qwen2)
        );
        assert_eq!(
            PreTokenizer::from_gguf_name("gpt-2"),
            Some(PreTokenizer::Gpt2)
        );
        assert_eq!(PreTokenizer::from_gguf_name("default"), None);
        for name in PreTokenizer::SUPPORTED.split(", ") {
            assert!(
                PreTokenizer::from_gguf_name(name.trim()).is_some(),
                "{name}"
            );
        }
    }
}
