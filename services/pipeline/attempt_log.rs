//! The attempt log: every attempt of each record (processor, start,
//! duration, error), kept only when a run asks for it
//! (`RunOptions.attempt_log`), for run timelines.
//!
//! A record's log lives with the record (one entry per attempt, so at most
//! `max_attempts` entries) and leaves with its `record` event; a run that
//! does not ask keeps an empty `Vec`, which allocates nothing.

use super::balancer::Endpoint;
use crate::domain::{Attempt, Failure};
use std::time::Instant;

/// Longest error message an attempt keeps, in bytes: the record's final
/// error carries the whole message; the log only needs to tell attempts
/// apart, and must stay small per record.
pub const MAX_ATTEMPT_MESSAGE: usize = 1024;

/// Appends one attempt to `log`: attempt number `attempt` of a call of
/// `batch_size` records on `endpoint` (`None`: no instance was up), started
/// at `start` and ending now with `error` (`None`: it succeeded). `epoch`
/// is the run's start.
pub fn push(
    log: &mut Vec<Attempt>,
    epoch: Instant,
    attempt: u32,
    endpoint: Option<&Endpoint>,
    start: Instant,
    error: Option<Failure>,
    batch_size: usize,
) {
    log.push(Attempt {
        attempt,
        processor: endpoint.map(Endpoint::label).unwrap_or_default(),
        start: start.saturating_duration_since(epoch),
        elapsed: start.elapsed(),
        error: error.map(|mut f| {
            truncate(&mut f.message, MAX_ATTEMPT_MESSAGE);
            f
        }),
        batch_size: batch_size as u32,
    });
}

/// A status as an attempt's failure.
pub fn failure(status: &tonic::Status) -> Failure {
    Failure { code: status.code(), message: status.message().to_owned() }
}

/// Cuts `s` to at most `max` bytes, on a character boundary, marking the cut.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(1000);
        truncate(&mut s, MAX_ATTEMPT_MESSAGE);
        assert!(s.len() <= MAX_ATTEMPT_MESSAGE && s.ends_with('…'), "{}", s.len());
        let mut short = "short".to_owned();
        truncate(&mut short, MAX_ATTEMPT_MESSAGE);
        assert_eq!(short, "short");
    }

    #[test]
    fn an_attempt_is_timed_from_the_run_start() {
        let epoch = Instant::now();
        let start = epoch + Duration::from_millis(5);
        let mut log = Vec::new();
        let err = Failure { code: tonic::Code::Unavailable, message: "x".repeat(5000) };
        push(&mut log, epoch, 2, None, start, Some(err), 3);
        let a = &log[0];
        assert_eq!((a.attempt, a.processor.as_str(), a.batch_size), (2, "", 3));
        assert_eq!(a.start, Duration::from_millis(5));
        assert!(a.error.as_ref().unwrap().message.len() <= MAX_ATTEMPT_MESSAGE);
    }
}
