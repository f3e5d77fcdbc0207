//! Reading newline-delimited messages with a size bound from an async peer; the splitting
//! itself is [`vfmap_core::lines`], shared with the agent.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
pub use vfmap_core::lines::Line;
use vfmap_core::lines::LineSplitter;

/// A bounded line reader. Cancel-safe: the partial line lives in the reader, so dropping
/// [`LineReader::next_line`]'s future (e.g. in a `select!`) loses no bytes.
#[derive(Debug)]
pub struct LineReader<R> {
    reader: R,
    splitter: LineSplitter,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// Lines of at most `max` bytes from `reader`.
    pub fn new(reader: R, max: usize) -> LineReader<R> {
        LineReader {
            reader,
            splitter: LineSplitter::new(max),
        }
    }

    /// The next line; over-long lines are consumed and reported, never held whole.
    pub async fn next_line(&mut self) -> std::io::Result<Line> {
        loop {
            // The only await: after it, everything up to the return is synchronous.
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok(self.splitter.finish());
            }
            let (used, line) = self.splitter.feed(available);
            self.reader.consume(used);
            if let Some(line) = line {
                return Ok(line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn bounded_lines() {
        let input = format!("ok\n{}\nnext\npartial", "x".repeat(100));
        let reader = tokio::io::BufReader::with_capacity(16, input.as_bytes());
        let mut lines = LineReader::new(reader, 10);
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"ok".to_vec())
        );
        assert_eq!(lines.next_line().await.unwrap(), Line::TooLong(100));
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"next".to_vec())
        );
        assert_eq!(lines.next_line().await.unwrap(), Line::TooLong(7));
        assert_eq!(lines.next_line().await.unwrap(), Line::Eof);
    }

    /// A read interrupted mid-line (another `select!` branch won) keeps the bytes it had.
    #[tokio::test]
    async fn an_interrupted_read_loses_nothing() {
        let (client, server) = tokio::io::duplex(64);
        let mut lines = LineReader::new(tokio::io::BufReader::new(server), 100);
        let (_, mut write) = tokio::io::split(client);
        write.write_all(b"{\"half\":").await.unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(50), lines.next_line()).await;
        assert!(cut.is_err(), "no line yet");
        write.write_all(b"1}\n").await.unwrap();
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"{\"half\":1}".to_vec())
        );
    }
}
