//! Reading newline-delimited messages with a size bound, from peers that may misbehave.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line read with [`read_line`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Complete(Vec<u8>),
    /// A line longer than the limit; its bytes were skipped up to the next newline.
    TooLong(usize),
    /// The peer closed the stream.
    Eof,
}

/// Reads one line of at most `max` bytes. A longer line is consumed and reported, never held
/// in memory whole: a peer cannot make us buffer more than `max` bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut skipped = 0usize;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // EOF: a partial line at the end is dropped like a bad line.
            return Ok(if line.is_empty() && skipped == 0 {
                Line::Eof
            } else {
                Line::TooLong(line.len() + skipped)
            });
        }
        let (chunk, found_newline) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        let used = chunk.len() + usize::from(found_newline);
        if skipped > 0 || line.len() + chunk.len() > max {
            skipped += line.len() + chunk.len();
            line.clear();
        } else {
            line.extend_from_slice(chunk);
        }
        reader.consume(used);
        if found_newline {
            return Ok(if skipped > 0 {
                Line::TooLong(skipped)
            } else {
                Line::Complete(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_lines() {
        let input = format!("ok\n{}\nnext\npartial", "x".repeat(100));
        let mut reader = tokio::io::BufReader::with_capacity(16, input.as_bytes());
        assert_eq!(
            read_line(&mut reader, 10).await.unwrap(),
            Line::Complete(b"ok".to_vec())
        );
        assert_eq!(
            read_line(&mut reader, 10).await.unwrap(),
            Line::TooLong(100)
        );
        assert_eq!(
            read_line(&mut reader, 10).await.unwrap(),
            Line::Complete(b"next".to_vec())
        );
        assert_eq!(read_line(&mut reader, 10).await.unwrap(), Line::TooLong(7));
        assert_eq!(read_line(&mut reader, 10).await.unwrap(), Line::Eof);
    }
}
