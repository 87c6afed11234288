//! Reading an instance's output file: the last N lines, then (when following) what is appended.

use std::collections::VecDeque;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::error::{Result, RuntimeError};
use crate::types::{LogLine, LogOptions, LogSource, LogStream, drain_lines};

/// How often a following reader looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Read size.
const CHUNK: usize = 64 * 1024;

/// Offset in `file` where its last `n` lines start (a final line without a newline counts).
async fn tail_offset(file: &mut tokio::fs::File, len: u64, n: usize) -> std::io::Result<u64> {
    if n == 0 {
        return Ok(len);
    }
    let mut pos = len;
    let mut newlines = 0usize;
    let mut buf = vec![0u8; CHUNK];
    let mut first_byte_seen = false;
    while pos > 0 {
        let step = (pos as usize).min(CHUNK);
        pos -= step as u64;
        file.seek(SeekFrom::Start(pos)).await?;
        file.read_exact(&mut buf[..step]).await?;
        for i in (0..step).rev() {
            if buf[i] == b'\n' {
                // The newline ending the file does not start a line.
                if !first_byte_seen {
                    first_byte_seen = true;
                    continue;
                }
                newlines += 1;
                if newlines == n {
                    return Ok(pos + i as u64 + 1);
                }
            }
            first_byte_seen = true;
        }
    }
    Ok(0)
}

struct Reader {
    file: tokio::fs::File,
    buf: Vec<u8>,
    ready: VecDeque<LogLine>,
    follow: bool,
    exited: watch::Receiver<bool>,
    done: bool,
}

impl Reader {
    async fn next_line(&mut self) -> Option<Result<LogLine>> {
        loop {
            if let Some(l) = self.ready.pop_front() {
                return Some(Ok(l));
            }
            if self.done {
                return None;
            }
            // Look at `exited` before reading, so nothing written before the exit is missed.
            let ended = *self.exited.borrow();
            let mut chunk = vec![0u8; CHUNK];
            let n = match self.file.read(&mut chunk).await {
                Ok(n) => n,
                Err(source) => {
                    self.done = true;
                    return Some(Err(RuntimeError::Io {
                        op: "reading logs",
                        source,
                    }));
                }
            };
            if n > 0 {
                self.buf.extend_from_slice(&chunk[..n]);
                let mut out = Vec::new();
                drain_lines(&mut self.buf, LogSource::Output, &mut out);
                self.ready.extend(out);
                continue;
            }
            if !self.follow || ended {
                self.done = true;
                if !self.buf.is_empty() {
                    let line = String::from_utf8_lossy(&self.buf).into_owned();
                    self.buf.clear();
                    self.ready.push_back(LogLine {
                        source: LogSource::Output,
                        line,
                    });
                }
                continue;
            }
            let mut exited = self.exited.clone();
            let _ = tokio::time::timeout(FOLLOW_POLL, exited.changed()).await;
        }
    }
}

/// A stream over `path` honouring `opts`; following stops once `exited` turns true and the file
/// is read to its end.
pub(crate) async fn file_log_stream(
    path: PathBuf,
    opts: LogOptions,
    exited: watch::Receiver<bool>,
) -> Result<LogStream> {
    let io = |source| RuntimeError::Io {
        op: "opening logs",
        source,
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().await.map_err(io)?.len();
    let start = match opts.tail {
        Some(n) => tail_offset(&mut file, len, n).await.map_err(io)?,
        None => 0,
    };
    file.seek(SeekFrom::Start(start)).await.map_err(io)?;
    let reader = Reader {
        file,
        buf: Vec::new(),
        ready: VecDeque::new(),
        follow: opts.follow,
        exited,
        done: false,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        reader,
        |mut r| async move { r.next_line().await.map(|l| (l, r)) },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn read_all(path: PathBuf, tail: Option<usize>) -> Vec<String> {
        let (_tx, rx) = watch::channel(true);
        file_log_stream(
            path,
            LogOptions {
                tail,
                follow: false,
            },
            rx,
        )
        .await
        .unwrap()
        .map(|l| l.unwrap().line)
        .collect()
        .await
    }

    #[tokio::test]
    async fn tail_returns_exactly_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.log");
        let text: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(
            read_all(p.clone(), Some(2)).await,
            ["line 199998", "line 199999"]
        );
        assert_eq!(read_all(p.clone(), Some(0)).await, Vec::<String>::new());
        assert_eq!(read_all(p, None).await.len(), 200_000);
    }

    #[tokio::test]
    async fn a_last_line_without_newline_is_returned_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.log");
        std::fs::write(&p, "a\nb\nc").unwrap();
        assert_eq!(read_all(p.clone(), Some(2)).await, ["b", "c"]);
        assert_eq!(read_all(p, Some(10)).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn following_sees_appended_lines_and_ends_when_the_instance_exits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.log");
        std::fs::write(&p, "first\n").unwrap();
        let (tx, rx) = watch::channel(false);
        let mut s = file_log_stream(
            p.clone(),
            LogOptions {
                tail: None,
                follow: true,
            },
            rx,
        )
        .await
        .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().line, "first");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        writeln!(f, "second").unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().line, "second");
        tx.send(true).unwrap();
        assert!(s.next().await.is_none());
    }
}
