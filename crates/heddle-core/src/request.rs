//! Requests: identity, priority, lifecycle, sampling parameters and stop criteria.

use std::fmt;
use std::str::FromStr;

use crate::error::CoreError;

/// A request's identity inside one scheduler. The server maps its own string ids onto these.
pub type RequestId = u64;

/// A token id of the model's vocabulary.
pub type TokenId = u32;

/// How urgent a request is. Lower is more urgent; waiting requests age towards
/// more urgent values (see [`crate::queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    High = 0,
    #[default]
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The numeric base of the effective priority.
    pub fn value(self) -> u8 {
        self as u8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn from_value(value: i64) -> Result<Self, CoreError> {
        match value {
            0 => Ok(Priority::High),
            1 => Ok(Priority::Normal),
            2 => Ok(Priority::Low),
            other => Err(CoreError::InvalidPriority(other.to_string())),
        }
    }
}

impl FromStr for Priority {
    type Err = CoreError;

    /// Accepts "high", "normal", "low" (any case) and "0", "1", "2".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" | "0" => Ok(Priority::High),
            "normal" | "1" => Ok(Priority::Normal),
            "low" | "2" => Ok(Priority::Low),
            _ => Err(CoreError::InvalidPriority(s.to_string())),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// max_tokens reached (or the model's context length).
    Length,
    /// The client left or the server cancelled it.
    Cancelled,
    /// The engine failed while running it.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request is in its life. Transitions are checked by [`RequestStatus::transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStatus {
    /// In the waiting queue, never admitted.
    Waiting,
    /// Admitted; prompt tokens still being computed (possibly over several chunks).
    Prefilling,
    /// Prompt done; one token per step.
    Running,
    /// Evicted from the batch to free blocks or seats; back in the waiting queue with its
    /// generated tokens kept, recomputed when admitted again.
    Preempted,
    /// Ended by stop or length (or error).
    Finished(FinishReason),
    /// Ended by cancellation.
    Cancelled,
}

impl RequestStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, RequestStatus::Finished(_) | RequestStatus::Cancelled)
    }

    pub fn is_waiting(self) -> bool {
        matches!(self, RequestStatus::Waiting | RequestStatus::Preempted)
    }

    /// Admitted and not ended: prefilling or decoding.
    pub fn is_running(self) -> bool {
        matches!(self, RequestStatus::Prefilling | RequestStatus::Running)
    }

    /// Whether `self → to` is a legal step of the lifecycle.
    pub fn can_become(self, to: RequestStatus) -> bool {
        use RequestStatus::*;
        match (self, to) {
            // Admission always prefills, even a prompt found whole in the prefix cache:
            // its last token is recomputed for the logits.
            (Waiting | Preempted, Prefilling) => true,
            (Prefilling, Running) => true,
            (Prefilling | Running, Preempted) => true,
            (Prefilling | Running, Finished(_)) => true,
            // A request may be refused or fail before it ever runs.
            (Waiting | Preempted, Finished(FinishReason::Error)) => true,
            (s, Cancelled) => !s.is_terminal(),
            _ => false,
        }
    }

    /// Moves to `to`, or reports the illegal transition and stays unchanged.
    pub fn transition(&mut self, to: RequestStatus) -> Result<(), CoreError> {
        if self.can_become(to) {
            *self = to;
            Ok(())
        } else {
            Err(CoreError::IllegalTransition { from: *self, to })
        }
    }
}

/// How the next token is drawn from the logits. Validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: u32,
    /// Drop tokens whose probability is below min_p × the top probability; 0 disables it.
    pub min_p: f32,
    /// Multiplicative penalty (> 0) on tokens seen in prompt or output; 1 disables it.
    pub repetition_penalty: f32,
    /// Subtracted per occurrence in the output, in [-2, 2].
    pub frequency_penalty: f32,
    /// Subtracted once if present in the output, in [-2, 2].
    pub presence_penalty: f32,
    /// Makes sampling reproducible, whatever else is in the batch.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability.
    pub logprobs: bool,
    /// How many alternatives with their log-probabilities (0..=20).
    pub top_logprobs: u32,
    /// Return the log-probability of every prompt token after the first, given the tokens
    /// before it, with this many alternatives (0..=20) — what scoring a text needs (the
    /// legacy completions' `echo` with `logprobs`). The prompt is then computed, never
    /// served from the prefix cache.
    pub prompt_logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logprobs: false,
            top_logprobs: 0,
            prompt_logprobs: None,
        }
    }
}

/// The most alternatives a request may ask for, as in OpenAI's API.
pub const MAX_TOP_LOGPROBS: u32 = 20;

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether any penalty needs the token history.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        let bad =
            |param: &'static str, reason: String| Err(CoreError::InvalidParam { param, reason });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!("must be in [-2, 2], got {}", self.frequency_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!("must be in [-2, 2], got {}", self.presence_penalty),
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!(
                    "must be in [0, {MAX_TOP_LOGPROBS}], got {}",
                    self.top_logprobs
                ),
            );
        }
        if let Some(top) = self.prompt_logprobs.filter(|&top| top > MAX_TOP_LOGPROBS) {
            return bad(
                "prompt_logprobs",
                format!("must be in [0, {MAX_TOP_LOGPROBS}], got {top}"),
            );
        }
        Ok(())
    }
}

/// When a request stops generating.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCriteria {
    /// Most tokens to generate (>= 1).
    pub max_tokens: usize,
    /// The model's end-of-sequence / end-of-turn ids; ignored when `ignore_eos`.
    pub eos_token_ids: Vec<TokenId>,
    /// The request's own stop token ids; always honoured.
    pub stop_token_ids: Vec<TokenId>,
    /// Text that ends the request; matched on detokenized text by the engine, which then
    /// calls [`crate::Scheduler::finish`].
    pub stop_strings: Vec<String>,
    /// Keep generating past EOS (benchmarks want exactly max_tokens tokens).
    pub ignore_eos: bool,
}

/// Bounds on a request's stop conditions, which are checked after every generated token
/// on the engine thread all requests share. Generous next to OpenAI's API (at most four
/// stop strings): an OpenAI or vLLM client does not meet them, a hostile one cannot make
/// the checks costly.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in UTF-8 bytes.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// The most stop token ids.
pub const MAX_STOP_TOKEN_IDS: usize = 256;

impl StopCriteria {
    pub fn new(max_tokens: usize) -> Self {
        StopCriteria {
            max_tokens,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if self.max_tokens < 1 {
            return Err(CoreError::InvalidParam {
                param: "max_tokens",
                reason: format!("must be >= 1, got {}", self.max_tokens),
            });
        }
        if self.stop_strings.len() > MAX_STOP_STRINGS {
            return Err(CoreError::InvalidParam {
                param: "stop",
                reason: format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop_strings.len()
                ),
            });
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return Err(CoreError::InvalidParam {
                param: "stop",
                reason: "stop strings must not be empty".into(),
            });
        }
        if let Some(long) = self
            .stop_strings
            .iter()
            .find(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(CoreError::InvalidParam {
                param: "stop",
                reason: format!(
                    "stop strings must be at most {MAX_STOP_STRING_BYTES} bytes long, got one \
                     of {} bytes",
                    long.len()
                ),
            });
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(CoreError::InvalidParam {
                param: "stop_token_ids",
                reason: format!(
                    "at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}",
                    self.stop_token_ids.len()
                ),
            });
        }
        Ok(())
    }

    /// Whether `token` ends the request.
    pub fn is_stop_token(&self, token: TokenId) -> bool {
        self.stop_token_ids.contains(&token)
            || (!self.ignore_eos && self.eos_token_ids.contains(&token))
    }
}

/// Everything the scheduler needs to run one request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: RequestId,
    pub prompt: Vec<TokenId>,
    pub priority: Priority,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// Seconds on the caller's clock when the request arrived; ages the request.
    pub arrival: f64,
}

impl Request {
    pub fn new(id: RequestId, prompt: Vec<TokenId>, max_tokens: usize, arrival: f64) -> Self {
        Request {
            id,
            prompt,
            priority: Priority::Normal,
            sampling: SamplingParams::default(),
            stop: StopCriteria::new(max_tokens),
            arrival,
        }
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if self.prompt.is_empty() {
            return Err(CoreError::InvalidParam {
                param: "prompt",
                reason: "the prompt must have at least one token".into(),
            });
        }
        self.sampling.validate()?;
        self.stop.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_parses_names_and_numbers() {
        assert_eq!("high".parse::<Priority>().unwrap(), Priority::High);
        assert_eq!("NORMAL".parse::<Priority>().unwrap(), Priority::Normal);
        assert_eq!("2".parse::<Priority>().unwrap(), Priority::Low);
        assert_eq!(Priority::from_value(0).unwrap(), Priority::High);
        let err = "urgent".parse::<Priority>().unwrap_err();
        assert!(err.to_string().contains("urgent"), "{err}");
        assert!(Priority::from_value(3).is_err());
        assert!(Priority::from_value(-1).is_err());
        assert!(Priority::High < Priority::Normal && Priority::Normal < Priority::Low);
    }

    #[test]
    fn lifecycle_allows_the_legal_path() {
        let mut s = RequestStatus::Waiting;
        s.transition(RequestStatus::Prefilling).unwrap();
        s.transition(RequestStatus::Running).unwrap();
        s.transition(RequestStatus::Preempted).unwrap();
        s.transition(RequestStatus::Prefilling).unwrap();
        s.transition(RequestStatus::Running).unwrap();
        s.transition(RequestStatus::Finished(FinishReason::Length))
            .unwrap();
        assert!(s.is_terminal());
    }

    #[test]
    fn illegal_transitions_are_errors_and_change_nothing() {
        let mut s = RequestStatus::Waiting;
        let err = s
            .transition(RequestStatus::Finished(FinishReason::Stop))
            .unwrap_err();
        assert!(matches!(err, CoreError::IllegalTransition { .. }));
        assert_eq!(s, RequestStatus::Waiting);

        let mut done = RequestStatus::Finished(FinishReason::Stop);
        assert!(done.transition(RequestStatus::Running).is_err());
        assert!(done.transition(RequestStatus::Cancelled).is_err());
        let mut cancelled = RequestStatus::Cancelled;
        assert!(cancelled.transition(RequestStatus::Cancelled).is_err());
        let mut waiting = RequestStatus::Waiting;
        assert!(waiting.transition(RequestStatus::Running).is_err());
        let mut preempted = RequestStatus::Preempted;
        assert!(preempted.transition(RequestStatus::Running).is_err());
        let mut running = RequestStatus::Running;
        assert!(running.transition(RequestStatus::Prefilling).is_err());
        assert!(running.transition(RequestStatus::Waiting).is_err());
    }

    #[test]
    fn any_live_status_can_be_cancelled() {
        for s in [
            RequestStatus::Waiting,
            RequestStatus::Prefilling,
            RequestStatus::Running,
            RequestStatus::Preempted,
        ] {
            let mut s = s;
            s.transition(RequestStatus::Cancelled).unwrap();
        }
    }

    #[test]
    fn sampling_validation_names_the_bad_parameter() {
        assert!(SamplingParams::default().validate().is_ok());
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.01,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.5,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: -3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    top_logprobs: 21,
                    ..Default::default()
                },
                "top_logprobs",
            ),
            (
                SamplingParams {
                    prompt_logprobs: Some(21),
                    ..Default::default()
                },
                "prompt_logprobs",
            ),
        ];
        for (params, name) in cases {
            match params.validate() {
                Err(CoreError::InvalidParam { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn stop_criteria_validation_and_eos() {
        assert!(StopCriteria::new(0).validate().is_err());
        let mut stop = StopCriteria::new(4);
        stop.eos_token_ids = vec![2];
        stop.stop_token_ids = vec![7];
        assert!(stop.is_stop_token(2) && stop.is_stop_token(7) && !stop.is_stop_token(3));
        stop.ignore_eos = true;
        assert!(!stop.is_stop_token(2) && stop.is_stop_token(7));
        stop.stop_strings = vec!["".into()];
        assert!(stop.validate().is_err());
        stop.stop_strings = vec!["a".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS];
        stop.stop_token_ids = vec![7; MAX_STOP_TOKEN_IDS];
        assert!(stop.validate().is_ok());
        let rejected = |stop: &StopCriteria| match stop.validate() {
            Err(CoreError::InvalidParam { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        let mut too_many = stop.clone();
        too_many.stop_strings.push("b".into());
        assert_eq!(rejected(&too_many), "stop");
        let mut too_long = stop.clone();
        too_long.stop_strings[3].push('é');
        assert_eq!(rejected(&too_long), "stop");
        let mut too_many_ids = stop.clone();
        too_many_ids.stop_token_ids.push(8);
        assert_eq!(rejected(&too_many_ids), "stop_token_ids");
    }

    #[test]
    fn empty_prompt_is_refused() {
        let r = Request::new(1, vec![], 4, 0.0);
        assert!(r.validate().is_err());
    }
}
