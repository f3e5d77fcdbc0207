//! Splitting a byte stream into newline-delimited lines with a size bound, for peers that may
//! misbehave. Pure: the daemon (async) and the agent (sync) feed it what their readers hold.

/// One line taken from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Complete(Vec<u8>),
    /// A line longer than the limit (or cut by the end of the stream); its bytes were skipped.
    TooLong(usize),
    /// The stream ended with no partial line.
    Eof,
}

/// Splits lines of at most `max` bytes. A longer line is consumed and reported, never held
/// whole: a peer cannot make us buffer more than `max` bytes. The partial line is kept here
/// between calls, so a reader that is interrupted between reads loses nothing.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    skipped: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            max,
            line: Vec::new(),
            skipped: 0,
        }
    }

    /// Takes bytes from `available`: returns how many it used, and the line they ended.
    pub fn feed(&mut self, available: &[u8]) -> (usize, Option<Line>) {
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if self.skipped > 0 || self.line.len() + chunk.len() > self.max {
            self.skipped += self.line.len() + chunk.len();
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(chunk);
        }
        let used = chunk.len() + usize::from(newline.is_some());
        let line = newline.map(|_| self.take());
        (used, line)
    }

    /// The stream ended: a partial line at the end is reported like an over-long one.
    pub fn finish(&mut self) -> Line {
        if self.line.is_empty() && self.skipped == 0 {
            Line::Eof
        } else {
            self.skipped += self.line.len();
            self.line = Vec::new();
            Line::TooLong(std::mem::take(&mut self.skipped))
        }
    }

    fn take(&mut self) -> Line {
        if self.skipped > 0 {
            self.line = Vec::new();
            Line::TooLong(std::mem::take(&mut self.skipped))
        } else {
            Line::Complete(std::mem::take(&mut self.line))
        }
    }
}

/// Reads one line from a blocking reader (the agent's port).
pub fn read_line_sync(
    reader: &mut impl std::io::BufRead,
    splitter: &mut LineSplitter,
) -> std::io::Result<Line> {
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(splitter.finish());
        }
        let (used, line) = splitter.feed(available);
        reader.consume(used);
        if let Some(line) = line {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounded_lines() {
        let input = format!("ok\n{}\nnext\npartial", "x".repeat(100));
        let mut reader = std::io::BufReader::with_capacity(16, input.as_bytes());
        let mut s = LineSplitter::new(10);
        let mut next = || read_line_sync(&mut reader, &mut s).unwrap();
        assert_eq!(next(), Line::Complete(b"ok".to_vec()));
        assert_eq!(next(), Line::TooLong(100));
        assert_eq!(next(), Line::Complete(b"next".to_vec()));
        assert_eq!(next(), Line::TooLong(7));
        assert_eq!(next(), Line::Eof);
    }

    proptest! {
        /// However the stream is cut into reads, the lines are the same, and none is longer
        /// than the bound.
        #[test]
        fn lines_do_not_depend_on_how_reads_are_cut(
            bytes in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..400),
            cuts in proptest::collection::vec(1usize..40, 1..20),
        ) {
            let whole = {
                let mut s = LineSplitter::new(16);
                let (mut out, mut rest) = (Vec::new(), &bytes[..]);
                while !rest.is_empty() {
                    let (used, line) = s.feed(rest);
                    rest = &rest[used..];
                    out.extend(line);
                }
                out.push(s.finish());
                out
            };
            let mut s = LineSplitter::new(16);
            let (mut out, mut rest, mut i) = (Vec::new(), &bytes[..], 0);
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                let mut piece = &rest[..n];
                while !piece.is_empty() {
                    let (used, line) = s.feed(piece);
                    piece = &piece[used..];
                    out.extend(line);
                }
                rest = &rest[n..];
            }
            out.push(s.finish());
            prop_assert_eq!(&out, &whole);
            for line in &out {
                if let Line::Complete(l) = line {
                    prop_assert!(l.len() <= 16);
                }
            }
        }
    }
}
