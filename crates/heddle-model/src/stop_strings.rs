//! Stop strings over streamed text: the client must never see a stop string, nor any part
//! of one, yet text that cannot start one should not wait.
//!
//! Text that could be the beginning of a stop string is held back until the next delta
//! shows whether it is; everything before it is released at once. Each stop string keeps
//! a Knuth–Morris–Pratt state (how much of it the text ends with), advanced one byte at a
//! time, so a stop string split across any number of deltas is found and the held text
//! is never scanned again: a delta of `d` bytes costs O(stops × d) amortised, and never
//! more than O(stops × (d + longest stop)), however long the generation. This runs on the
//! engine thread every request shares, once per generated token.
//!
//! Matching is on bytes. Stop strings and text are UTF-8, whose characters never start
//! inside another character, so byte matches start at character boundaries.

/// What to emit after a delta.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopScan {
    /// Text that is safe to send now.
    pub text: String,
    /// The index, in the list given to [`StopStringMatcher::new`], of the stop string just
    /// found: the request is finished, and `text` ends right before the stop string.
    pub stop: Option<usize>,
}

/// Per-request stop-string matcher.
#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    /// Empty strings are dropped (they would match everywhere).
    stops: Vec<StopPattern>,
    /// Tail of the text that may be the start of a stop string: as long as the longest
    /// partial match, so shorter than the longest stop string.
    held: String,
}

/// One stop string and how much of it the text seen so far ends with.
#[derive(Debug, Clone)]
struct StopPattern {
    /// Its index in the caller's list.
    index: usize,
    bytes: Box<[u8]>,
    /// `fallback[i]`: the length of the longest proper prefix of `bytes[..=i]` that is
    /// also a suffix of it, where matching resumes after a mismatch.
    fallback: Box<[usize]>,
    /// Bytes of the stop string the text ends with (always shorter than the string).
    matched: usize,
}

impl StopPattern {
    fn new(index: usize, text: &str) -> Self {
        let bytes: Box<[u8]> = text.as_bytes().into();
        let mut fallback = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fallback[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        StopPattern {
            index,
            bytes,
            fallback: fallback.into(),
            matched: 0,
        }
    }

    /// Feeds the next byte of the text; true when the stop string ends with it.
    fn advance(&mut self, byte: u8) -> bool {
        while self.matched > 0 && self.bytes[self.matched] != byte {
            self.matched = self.fallback[self.matched - 1];
        }
        if self.bytes[self.matched] == byte {
            self.matched += 1;
        }
        if self.matched == self.bytes.len() {
            self.matched = self.fallback[self.matched - 1];
            return true;
        }
        false
    }
}

impl StopStringMatcher {
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let stops = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.as_ref().is_empty())
            .map(|(i, s)| StopPattern::new(i, s.as_ref()))
            .collect();
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Feeds the next piece of generated text.
    ///
    /// When several stop strings occur, the one that completes first in the stream wins
    /// (so the result does not depend on how the text was split into deltas); of those
    /// completing at the same point, the longest, so that none of it is emitted.
    pub fn push(&mut self, delta: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan {
                text: delta.to_owned(),
                stop: None,
            };
        }
        let delta_start = self.held.len();
        self.held.push_str(delta);
        for (offset, &byte) in delta.as_bytes().iter().enumerate() {
            // (length, index) of the stop string completed by this byte: longest first,
            // then the first in the caller's list.
            let mut completed: Option<(usize, usize)> = None;
            for stop in &mut self.stops {
                // Stops are in list order: on equal lengths the first one found stays.
                if stop.advance(byte) && completed.is_none_or(|(len, _)| stop.bytes.len() > len) {
                    completed = Some((stop.bytes.len(), stop.index));
                }
            }
            if let Some((len, index)) = completed {
                let end = delta_start + offset + 1;
                self.held.truncate(end - len);
                self.reset();
                return StopScan {
                    text: std::mem::take(&mut self.held),
                    stop: Some(index),
                };
            }
        }
        let partial = self.stops.iter().map(|s| s.matched).max().unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - partial);
        StopScan {
            text: std::mem::replace(&mut self.held, rest),
            stop: None,
        }
    }

    /// Generation ended without a stop string (EOS, length, ...): the held text turned out
    /// not to be a stop string, so it is released.
    pub fn finish(&mut self) -> String {
        self.reset();
        std::mem::take(&mut self.held)
    }

    fn reset(&mut self) {
        for stop in &mut self.stops {
            stop.matched = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas` and returns (all emitted text, stop index if any), flushing at the
    /// end when nothing stopped.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
        let mut matcher = StopStringMatcher::new(stops);
        let mut out = String::new();
        for delta in deltas {
            let scan = matcher.push(delta);
            out.push_str(&scan.text);
            if scan.stop.is_some() {
                return (out, scan.stop);
            }
        }
        out.push_str(&matcher.finish());
        (out, None)
    }

    #[test]
    fn no_stop_strings_pass_everything_through() {
        let mut matcher = StopStringMatcher::new(Vec::<String>::new());
        assert_eq!(matcher.push("abc").text, "abc");
        assert_eq!(matcher.finish(), "");
        let mut only_empty = StopStringMatcher::new([""]);
        assert_eq!(only_empty.push("abc").text, "abc");
    }

    #[test]
    fn stop_inside_one_delta_truncates_before_it() {
        assert_eq!(
            run(&["STOP"], &["hello STOP world"]),
            ("hello ".into(), Some(0))
        );
        assert_eq!(run(&["STOP"], &["STOP"]), ("".into(), Some(0)));
    }

    #[test]
    fn stop_split_across_deltas_is_found_and_never_leaks() {
        let mut matcher = StopStringMatcher::new(["</answer>"]);
        assert_eq!(
            matcher.push("42 </an"),
            StopScan {
                text: "42 ".into(),
                stop: None
            }
        );
        assert_eq!(matcher.push("sw"), StopScan::default());
        assert_eq!(
            matcher.push("er> trailing"),
            StopScan {
                text: "".into(),
                stop: Some(0)
            }
        );
        // One character per delta.
        let text = "the end.\n\nUser: hi";
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let deltas: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&["\n\nUser:"], &deltas), ("the end.".into(), Some(0)));
    }

    #[test]
    fn partial_prefix_that_fails_is_released() {
        let mut matcher = StopStringMatcher::new(["###"]);
        assert_eq!(matcher.push("a #").text, "a ");
        assert_eq!(matcher.push("#").text, "");
        assert_eq!(matcher.push("b").text, "##b");
        assert_eq!(matcher.push("##").text, "");
        assert_eq!(matcher.finish(), "##");
        // A failed prefix whose tail starts another candidate keeps only that tail.
        assert_eq!(run(&["aab"], &["a", "a", "a", "c"]), ("aaac".into(), None));
        let mut matcher = StopStringMatcher::new(["aab"]);
        assert_eq!(matcher.push("aaa").text, "a");
        assert_eq!(
            matcher.push("b"),
            StopScan {
                text: "".into(),
                stop: Some(0)
            }
        );
    }

    #[test]
    fn multiple_stops_first_completed_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), Some(1))
        );
        assert_eq!(
            run(&["world", "lo"], &["hel", "l", "o world"]),
            ("hel".into(), Some(1))
        );
        // "abcd" could have started earlier, but "bc" completes first.
        assert_eq!(run(&["abcd", "bc"], &["xabcd"]), ("xa".into(), Some(1)));
        assert_eq!(
            run(&["abcd", "bc"], &["xa", "b", "cd"]),
            ("xa".into(), Some(1))
        );
    }

    #[test]
    fn overlapping_stops_ending_together_cut_at_the_longest() {
        assert_eq!(run(&["b", "ab"], &["xab"]), ("x".into(), Some(1)));
        assert_eq!(run(&["b", "ab"], &["xa", "b"]), ("x".into(), Some(1)));
        assert_eq!(run(&["ab", "b"], &["x", "a", "b"]), ("x".into(), Some(0)));
    }

    #[test]
    fn self_overlapping_stop() {
        // "aaab" inside "aaaab": the match starts one byte in.
        assert_eq!(run(&["aaab"], &["aa", "aa", "b!"]), ("a".into(), Some(0)));
        assert_eq!(run(&["abab"], &["aba", "bab"]), ("".into(), Some(0)));
    }

    /// What the matcher must find, by searching the whole text at once: the stop string
    /// that ends first (the longest of those ending together, then the first listed), and
    /// the text before it.
    fn whole_text_answer(stops: &[&str], text: &str) -> (String, Option<usize>) {
        let found = stops
            .iter()
            .enumerate()
            .filter(|(_, stop)| !stop.is_empty())
            .filter_map(|(index, stop)| {
                text.find(stop)
                    .map(|start| (start + stop.len(), start, index))
            })
            .min();
        match found {
            Some((_, start, index)) => (text[..start].to_string(), Some(index)),
            None => (text.to_string(), None),
        }
    }

    #[test]
    fn matches_a_whole_text_search_however_the_text_is_split() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let alphabet = ['a', 'b', 'é', '😀'];
        let word = |rng: &mut rand_chacha::ChaCha8Rng, len: usize| -> String {
            (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..3000 {
            let stop_count = rng.random_range(1..4);
            let stops: Vec<String> = (0..stop_count)
                .map(|_| {
                    let len = rng.random_range(1..6);
                    word(&mut rng, len)
                })
                .collect();
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            let text_len = rng.random_range(0..30);
            let text = word(&mut rng, text_len);
            let chars: Vec<char> = text.chars().collect();
            let mut deltas = Vec::new();
            let mut at = 0;
            while at < chars.len() {
                let len = rng.random_range(1..5).min(chars.len() - at);
                deltas.push(chars[at..at + len].iter().collect::<String>());
                at += len;
            }
            let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
            assert_eq!(
                run(&stops, &deltas),
                whole_text_answer(&stops, &text),
                "stops {stops:?}, deltas {deltas:?}"
            );
        }
    }

    #[test]
    fn held_text_stays_shorter_than_the_longest_stop() {
        // A stop string every position of "aaa…" could start: the held text is the partial
        // match, never the whole generation.
        let long = format!("{}b", "a".repeat(255));
        let mut matcher = StopStringMatcher::new([long.as_str(), "ab"]);
        let mut released = 0;
        for pushed in 1..=20_000 {
            released += matcher.push("a").text.len();
            assert!(matcher.held.len() < long.len());
            assert_eq!(released + matcher.held.len(), pushed);
        }
        assert_eq!(matcher.push("c").text.len(), 256);
        assert_eq!(matcher.push("ab").stop, Some(1));
    }

    #[test]
    fn multibyte_text_and_stops() {
        assert_eq!(
            run(&["。"], &["日本", "語です。次"]),
            ("日本語です".into(), Some(0))
        );
        assert_eq!(
            run(&["🛑 end"], &["go 🛑", " e", "nd"]),
            ("go ".into(), Some(0))
        );
        assert_eq!(
            run(&["🛑 end"], &["go 🛑", " e", "xit"]),
            ("go 🛑 exit".into(), None)
        );
        // A stop that shares only leading bytes of a multi-byte character never matches.
        assert_eq!(run(&["é"], &["è", "ê"]), ("èê".into(), None));
    }
}
