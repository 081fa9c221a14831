//! Stop strings: matched across token boundaries, never emitted; text that might be the start
//! of a stop string is held back until it is known not to be.

/// Result of feeding one text delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is safe to send now.
    pub emit: String,
    /// A stop string was found; generation ends and nothing after it is sent.
    pub stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopStep {
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return StopStep { emit: std::mem::take(&mut self.held), stopped: false };
        }
        // The earliest stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopStep { emit, stopped: true };
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopStep { emit, stopped: false }
    }

    /// Releases held text when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_across_deltas_is_not_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for d in ["Hello E", "N", "Dx more"] {
            let s = m.push(d);
            out.push_str(&s.emit);
            stopped |= s.stopped;
            if s.stopped {
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn false_starts_are_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abcE").emit, "abc");
        assert_eq!(m.push("Nd").emit, "ENd");
        assert_eq!(m.push("E").emit, "");
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        let s = m.push("hello world");
        assert_eq!((s.emit.as_str(), s.stopped), ("hel", true));
    }
}
