//! Stop strings over streamed text. Text that could be the start of a stop string is held back
//! until the next piece shows whether it is; a match cuts the text right before the stop string.

#[derive(Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Feeds the next piece of text; returns the text that is safe to emit now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..cut].to_string();
            self.held.clear();
            return out;
        }
        // Hold back the longest tail of `held` that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(|p| p.len())
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        out
    }

    /// True once a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out += &m.push(p);
            if m.stopped() {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn cuts_before_a_stop_string_split_across_pieces() {
        assert_eq!(
            run(&["User:"], &["Hello ", "Us", "er: hi"]),
            ("Hello ".into(), true)
        );
        assert_eq!(
            run(&["User:"], &["Hello ", "Us", "ually"]),
            ("Hello Usually".into(), false)
        );
        assert_eq!(
            run(&["\n\n", "END"], &["a\n", "b", "E", "N", "D"]),
            ("a\nb".into(), true)
        );
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(&["éclair".to_string()]);
        assert_eq!(m.push("café é"), "café ");
        assert_eq!(m.push("t"), "ét");
    }
}
