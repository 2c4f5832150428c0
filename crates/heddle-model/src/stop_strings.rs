//! Stop strings over streamed text: the client must never see a stop string, nor any part
//! of one, yet text that cannot start one should not wait.
//!
//! Text that could be the beginning of a stop string is held back until the next delta
//! shows whether it is; everything before it is released at once. Matching runs over the
//! held text plus the new delta, so a stop string split across any number of deltas is
//! found, and the work per delta is bounded by the delta plus the longest stop string.

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
    /// (index in the caller's list, text); empty strings are dropped (they would match
    /// everywhere).
    stops: Vec<(usize, String)>,
    /// Tail of the text that may be the start of a stop string.
    held: String,
    longest: usize,
}

impl StopStringMatcher {
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let stops: Vec<(usize, String)> = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.as_ref().is_empty())
            .map(|(i, s)| (i, s.as_ref().to_owned()))
            .collect();
        let longest = stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        Self {
            stops,
            held: String::new(),
            longest,
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
        self.held.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|(index, stop)| {
                self.held
                    .find(stop.as_str())
                    .map(|start| (start + stop.len(), start, *index))
            })
            .min();
        if let Some((_, start, index)) = first {
            self.held.truncate(start);
            return StopScan {
                text: std::mem::take(&mut self.held),
                stop: Some(index),
            };
        }
        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        StopScan {
            text: std::mem::replace(&mut self.held, rest),
            stop: None,
        }
    }

    /// Generation ended without a stop string (EOS, length, ...): the held text turned out
    /// not to be a stop string, so it is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Where the longest suffix of the held text that is a proper prefix of a stop string
    /// begins (the end of the text if there is none). Only the last `longest - 1` bytes can
    /// qualify.
    fn partial_match_start(&self) -> usize {
        let text = self.held.as_str();
        let earliest = text.len().saturating_sub(self.longest.saturating_sub(1));
        (earliest..text.len())
            .filter(|&start| text.is_char_boundary(start))
            .find(|&start| {
                let tail = &text[start..];
                self.stops.iter().any(|(_, stop)| stop.starts_with(tail))
            })
            .unwrap_or(text.len())
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
